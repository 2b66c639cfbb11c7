"""Files in and out: TRIDENT/CLAM h5 patch and feature files, QuPath GeoJSON, state-dict checkpoints.

* :mod:`needlework.io.h5` — patch coordinates and features in TRIDENT's layout (CLAM and STAMP readable),
  written atomically (temporary name, fsync, rename).
* :mod:`needlework.io.geojson` — tiles and regions as QuPath-compatible GeoJSON, with a validator.
* :mod:`needlework.io.checkpoints` — read ``.pt``/``.pth``/``.bin``/``.safetensors`` state dicts and
  load them into a module with key and shape checks.

The package imports nothing on its own: import the submodule you need (h5py is loaded only by ``h5``).
"""
