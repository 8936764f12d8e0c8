"""The only Serve deployment classes of the project, and the application builder."""
