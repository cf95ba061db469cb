"""The kbsync daemon: service layer, CLI and (later) the model worker, scheduler, watcher and HTTP API."""
