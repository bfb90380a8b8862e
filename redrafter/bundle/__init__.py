"""The bundle: the one contract between export and the runtimes (docs/bundle.md).

`names` holds every name both sides agree on (files, graph I/O, caches, the custom op and its
versions, opset/IR); `manifest` the typed manifest; `store` the atomic writer and the checked
loader. `redrafter.export` writes bundles; runtimes, validate, bench, the CLI and benchmarks only
read them, through these types.
"""

from redrafter.bundle.manifest import (
    BundleError,
    CoreMLRecord,
    DrafterGraph,
    FileRecord,
    Manifest,
    OnnxRecord,
    OpRecord,
    Parity,
    Quantization,
    Source,
)
from redrafter.bundle.store import (
    Bundle,
    OutputPathError,
    atomic_directory,
    exporter_fingerprint,
    load_bundle,
    sha256,
    write_manifest,
)

__all__ = [
    "Bundle",
    "BundleError",
    "CoreMLRecord",
    "DrafterGraph",
    "FileRecord",
    "Manifest",
    "OnnxRecord",
    "OpRecord",
    "OutputPathError",
    "Parity",
    "Quantization",
    "Source",
    "atomic_directory",
    "exporter_fingerprint",
    "load_bundle",
    "sha256",
    "write_manifest",
]
