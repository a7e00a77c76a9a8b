"""Fine-tune a Sonett model for sequence classification on a small set made on the fly.

The classification example of docs/using.md as a script (tests/model/test_task_heads.py runs it). It reads the
folder that `make demo` writes, runs/sonett-tiny; the classification model lands in runs/sonett-sentiment.
"""

import random
import sys
from pathlib import Path

from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

folder = "runs/sonett-tiny"
if not (Path(folder) / "config.json").is_file():
    sys.exit(f"{folder} holds no model: run `make demo` (or `sonett train`) first; this example fine-tunes it.")
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
# The causal LM's body with a new `score` head (transformers logs it as newly initialised).
model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True, num_labels=2)

# Reviews of filler words and one sentiment word; label 1 when that word is positive.
rng = random.Random(0)
filler = ["the", "film", "was", "and", "its", "plot", "actors", "music", "ending", "felt", "quite", "long"]
positive, negative = ["good", "great", "lovely", "superb"], ["bad", "awful", "dull", "poor"]
texts, labels = [], []
for _ in range(600):
    label = rng.randrange(2)
    words = rng.choices(filler, k=rng.randrange(3, 9))
    words.insert(rng.randrange(len(words) + 1), rng.choice(positive if label else negative))
    texts.append(" ".join(words))
    labels.append(label)
data = Dataset.from_dict({"text": texts, "label": labels}).train_test_split(test_size=100, seed=0)
data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])


def accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


args = TrainingArguments(
    "runs/sonett-sentiment",
    num_train_epochs=3,
    per_device_train_batch_size=8,
    learning_rate=3e-3,
    eval_strategy="epoch",
    save_strategy="no",
    report_to="none",
)
trainer = Trainer(
    model=model,
    args=args,
    train_dataset=data["train"],
    eval_dataset=data["test"],
    data_collator=DataCollatorWithPadding(tokenizer),  # pads each batch (on the left, the tokenizer's side)
    compute_metrics=accuracy,
)
trainer.train()
print(trainer.evaluate())  # eval_accuracy near 1.0 (chance is 0.5)
trainer.save_model("runs/sonett-sentiment")
