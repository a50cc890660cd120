"""Workers: run inside a sandbox, consume its lifecycle jobs, and drive its dockerd."""
