"""Read and prepare a DB-GPT registry database (the HA controllers' shared registry) with DB-GPT
0.8.2's own table definition. Runs under the DB-GPT venv.

    $DBGPT_VENV/bin/python tests/interop/drivers/dbgpt_registry.py < spec.json

stdin (JSON): {"url": "sqlite:////path/registry.db" | "mysql+pymysql://root@127.0.0.1:P/dbgpt",
               "op": "create" | "rows" | "clear"}
  create: the database (MySQL) and DB-GPT's `dbgpt_cluster_registry_instance` table
          (the controller itself never creates them: `try_to_create_db=False`)
  rows:   every row, as [{"model_name", "host", "port", "healthy", "last_heartbeat"}]
  clear:  delete every row
stdout (JSON): {"rows": [...]} or {"ok": true}
"""

from __future__ import annotations

import json
import sys

REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr

from dbgpt.model.cluster.registry_impl.db_storage import ModelInstanceEntity  # noqa: E402
from sqlalchemy import create_engine, delete, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402


def main() -> int:
    spec = json.load(sys.stdin)
    url = make_url(spec["url"])
    table = ModelInstanceEntity.__table__
    result: dict[str, object] = {"ok": True}
    if spec["op"] == "create" and url.get_backend_name() == "mysql":
        server = create_engine(url.set(database=""))
        with server.begin() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{url.database}`"))
        server.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        if spec["op"] == "create":
            table.create(conn, checkfirst=True)
        elif spec["op"] == "clear":
            conn.execute(delete(table))
        else:
            columns = ("model_name", "host", "port", "healthy", "last_heartbeat")
            query = select(*(table.c[c] for c in columns)).order_by(table.c.id)
            rows = [dict(zip(columns, row, strict=True)) for row in conn.execute(query)]
            for row in rows:  # naive local time, as the controller wrote it
                row["last_heartbeat"] = str(row["last_heartbeat"] or "")
            result = {"rows": rows}
    engine.dispose()
    json.dump(result, REAL_STDOUT)
    REAL_STDOUT.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
