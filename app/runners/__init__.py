"""Execution backends behind one interface: local (one device), DeepSpeed TP, Fairscale PP."""
