"""What runs inside the server process (`streaming_server.py`): everything this project adds to vLLM's own server."""
