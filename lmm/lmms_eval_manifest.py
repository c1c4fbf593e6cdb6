"""lmms-eval's registration of the project's model, read through the ``lmms_eval.models`` entry point.

lmms-eval loads every entry point of that group when it builds its model registry, so this module stays
tiny: it names the class (``lmm.lmms_eval_plugin.EmergentGrounding``) without importing it, and lmms-eval
imports the class only when ``--model emergent_grounding`` is asked for.
"""

from lmms_eval.models.registry_v2 import ModelManifest

MANIFEST = ModelManifest(
    model_id="emergent_grounding",
    simple_class_path="lmm.lmms_eval_plugin.EmergentGrounding",
)
