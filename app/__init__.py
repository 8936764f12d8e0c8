"""Domain code of the serving system: config, wire formats, models, runners, planning, batching.

Nothing here imports Ray Serve decorators; deployments/ wires these pieces into Serve.
"""
