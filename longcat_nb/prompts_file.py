"""Validation prompts from a text file (train.validation_prompts_file): one prompt a line; ``prompt | image.png``
makes that prompt image-to-video. Blank lines and lines starting with # are skipped. The file is found
relative to the run folder (or absolute); an image relative to the file's own folder (or absolute)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import ConfigError


def read_prompts_file(path: Path) -> list[tuple[str, str]]:
    """(prompt, image path or "") per prompt line; ConfigError naming the file and line for a bad one."""
    if not path.is_file():
        raise ConfigError(f"train.validation_prompts_file: {path} does not exist: give a text file with one prompt "
                          "a line (relative to the run folder, or absolute), or \"\" for none")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"train.validation_prompts_file: {path} cannot be read as UTF-8 text ({e})") from None
    out = []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        prompt, bar, image = (part.strip() for part in text.partition("|"))
        where = f"{path}, line {n} ({text[:60]!r})"
        if not prompt or "|" in image or (bar and not image):
            raise ConfigError(f"{where}: write one prompt a line, optionally followed by ' | image.png' for "
                              "image-to-video (one '|', a prompt before it and an image after it)")
        if image:
            image_path = Path(image) if Path(image).is_absolute() else path.parent / image
            if not image_path.is_file():
                raise ConfigError(f"{where}: the image {image_path} does not exist (an image is found relative "
                                  f"to {path.parent}, or give an absolute path)")
            image = str(image_path)
        out.append((prompt, image))
    if not out:
        raise ConfigError(f"train.validation_prompts_file: {path} holds no prompt (one a line; # starts a comment)")
    return out


def with_prompts_file(run_dir: Path, s):
    """TrainSettings with the file's prompts (and images) after validation_prompts; as given without a file."""
    if not s.validation_prompts_file:
        return s
    path = Path(s.validation_prompts_file).expanduser()
    entries = read_prompts_file(path if path.is_absolute() else Path(run_dir) / path)
    images = list(s.validation_images) + [""] * (len(s.validation_prompts) - len(s.validation_images))
    return dataclasses.replace(s, validation_prompts=list(s.validation_prompts) + [p for p, _ in entries],
                               validation_images=images + [i for _, i in entries])
