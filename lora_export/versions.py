"""Versions of the packages that shape an export's numbers, recorded in every manifest."""

from importlib import metadata

PACKAGES = ("lora-export", "torch", "transformers", "peft", "bitsandbytes", "onnx", "onnxruntime",
            "onnxruntime-gpu", "onnxruntime-genai", "safetensors")


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
