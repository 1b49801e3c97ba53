"""ONC RPC version 2 (RFC 5531) and XDR (RFC 4506) for evpl."""
