"""Starting and stopping whole processes: a server, a cluster of replicas behind a router, a browser."""
