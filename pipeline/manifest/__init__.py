"""capsule.toml (0.2, 0.3, v1 and 1.x generations) and ato.delivery.toml -> one typed, validated model."""

from pipeline.manifest.delivery import SIDECAR_NAME, DeliveryMeta
from pipeline.manifest.model import Manifest, PackRules, Service, Target, Task
from pipeline.manifest.reader import MANIFEST_NAME, load_manifest, parse_manifest

__all__ = [
    "MANIFEST_NAME", "SIDECAR_NAME", "DeliveryMeta", "Manifest", "PackRules", "Service", "Target", "Task",
    "load_manifest", "parse_manifest",
]
