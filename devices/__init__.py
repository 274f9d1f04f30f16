"""Device profiles, shipped as YAML data (installed as ``edgepeft.devices``)."""
