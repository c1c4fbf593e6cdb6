"""The application layer of ``grounding``: commands that load a trained or released model and run the library.

Only modules in this package (and the command table ``grounding/__main__.py``) may import ``lmm``; the rest
of ``grounding`` is a library that talks to any model through ``grounding.protocol.GroundableModel``. Run a
command as ``python -m grounding <command> ...`` (``python -m grounding --help`` lists them) or as
``python -m grounding.commands.<module>``.
"""
