"""Adapter surgery and format writers (installed as ``edgepeft.export``)."""
