"""The I/O shell: settings, CLI, HTTP app, upstream client, registration lifecycle."""
