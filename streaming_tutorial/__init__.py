"""The tutorial's own code, in three wings that say where it runs:

- `server/`: inside the server process (`streaming_server.py`), what this project adds to vLLM's server;
- `client/`: in the learner's process (notebooks, tests, scripts), reading streams and measuring them;
- `processes/`: starting and stopping servers, clusters and a browser as whole processes.

`model.py` prepares the bundled model, which both sides use.
"""
