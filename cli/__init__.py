"""lawchat_cli: the one `lawchat` command, owned by neither the server nor the trainer."""
