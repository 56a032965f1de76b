"""The model card: Hub-parsable front matter (base model, license, library) and what a reader needs to trust
the conversion: recipe, source revision, validation summary and how to run it."""

import re
from pathlib import Path
from typing import Optional

import yaml


def source_metadata(folder: Path) -> dict:
    """Front matter of the source README, or {}."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return meta if isinstance(meta, dict) else {}


def render_card(*, repo_name: str, base_model: Optional[str], source_meta: dict, commit: Optional[str],
                recipe: str, dtype: str, bits_per_weight: float, quantized: bool, validation: str,
                skipped_layers: list, upload_repo: Optional[str], ignored_code: str = "",
                model_type: str = "", quantization_method: str = "", container: str = "",
                notes: tuple = ()) -> str:
    meta = {"library_name": "mlx", "pipeline_tag": source_meta.get("pipeline_tag", "text-generation")}
    if base_model:
        meta["base_model"] = base_model
        if quantized:
            meta["base_model_relation"] = "quantized"
    for key in ("license", "license_name", "license_link", "language"):
        if key in source_meta:
            meta[key] = source_meta[key]
    meta["tags"] = ["mlx"] + [t for t in source_meta.get("tags", []) or [] if t != "mlx"]
    repo = upload_repo or repo_name
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {repo}", "",
        (f"This model was converted to MLX from [{base_model}](https://huggingface.co/{base_model}) " if base_model
         else "This model was converted to MLX ") + "with mlx-convert, which checks the converted model against "
        "the transformers original before publishing.", "",
        "## Conversion", "",
        f"- Source revision: `{commit or 'local folder'}`",
        f"- Recipe: {recipe}",
        f"- Float dtype: {dtype}",
        f"- Bits per weight: {bits_per_weight:.2f}",
    ]
    if container:  # a multimodal source: which text model was kept, what was dropped
        lines.append(f"- Converted the {container}")
    lines += [f"- {note}" for note in notes]  # FP8 sources, tensors dropped by declared rules
    if quantization_method:  # how the codes were chosen, and on which calibration text
        lines.append(f"- Quantization method: {quantization_method}")
    if skipped_layers:
        lines.append(f"- Kept in full precision: {', '.join(skipped_layers)}")
    if ignored_code:
        lines.append(f"- The source repo ships its own code ({ignored_code}); it was neither downloaded nor run: "
                     f"converted and validated with the native transformers implementation of `{model_type}`")
    lines += ["", "## Validation", "", validation, "",
              "## Use with mlx-lm", "", "```bash", "pip install mlx-lm", "```", "", "```python",
              "from mlx_lm import load, generate", "", f'model, tokenizer = load("{repo}")',
              'prompt = "Hello"', "if tokenizer.chat_template is not None:",
              '    messages = [{"role": "user", "content": prompt}]',
              "    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)", "",
              "print(generate(model, tokenizer, prompt=prompt, verbose=True))", "```", ""]
    return "\n".join(lines)


def refresh(path: Path, validation: str, repo: str):
    """Put a new validation summary and repo name into a card written by `render_card` (a card without our
    Validation section is left as its author wrote it)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    section = re.search(r"(?<=\n## Validation\n\n).*?(?=\n\n## Use with mlx-lm\n)", text, flags=re.S)
    if section is None:
        return
    text = text[: section.start()] + validation + text[section.end():]
    text = re.sub(r"^# .*$", lambda m: f"# {repo}", text, count=1, flags=re.M)
    text = re.sub(r'load\("[^"\n]*"\)', lambda m: f'load("{repo}")', text)
    Path(path).write_text(text)
