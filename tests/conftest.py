"""Test-wide settings: offline Hugging Face libraries and caches kept out of the home directory."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="sonett-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
