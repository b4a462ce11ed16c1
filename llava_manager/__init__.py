"""The `llava-manager` command: one entry point for everything the project runs (`llava_manager.cli`)."""
