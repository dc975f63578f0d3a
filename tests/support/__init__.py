"""Test doubles and servers shared by the test suites: loopback uvicorn, fake FastChat peers."""
