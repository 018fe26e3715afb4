"""The seeds' composed model: a topic classifier head over MiniLM sentence embeddings, served as text -> label.

The labelled text is made here from templates (no download): four topics, each sentence a
template filled with topic words. Held-out sentences use templates and words that training
never saw, so the accuracy measures the embeddings' generalisation, not memory. The head
is trained on the embeddings the served encoder itself computes (ONNX Runtime on the exported
`<embedder>_encoder`, tokenized by the same tokenizer step), exported with exporters/export.py,
and chained after the embedding model's two steps in the ensemble `topics`:

    text -> <embedder>_tokenizer -> <embedder>_encoder -> topic_head -> logits (labels.txt)

Ask for `logits` with the classification extension (class_count 1) to get "score:index:label".
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exporters.export import ExportSpec, export_torch, write_ensemble
from server.runtime import onnx as ort_runtime
from server.runtime.tokenizer_runtime import TokenizerRuntime

LABELS = ["sports", "cooking", "technology", "weather"]
# Per topic: (training words, held-out words). Templates likewise, below.
WORDS = {
    "sports": (
        ["the striker", "the goalkeeper", "the team", "the coach", "the referee", "the midfielder",
         "the tennis player", "the sprinter", "the captain", "the defender"],
        ["the quarterback", "the cyclist", "the boxer", "the swimmer", "the pitcher"],
    ),
    "cooking": (
        ["the chef", "the baker", "the recipe", "the soup", "the sauce", "the dough", "the oven",
         "the frying pan", "the pastry", "the stew"],
        ["the risotto", "the marinade", "the sous-chef", "the casserole", "the omelette"],
    ),
    "technology": (
        ["the laptop", "the software update", "the smartphone", "the database", "the compiler",
         "the server", "the new processor", "the browser", "the operating system", "the router"],
        ["the graphics card", "the cloud service", "the firmware", "the mobile app", "the kernel"],
    ),
    "weather": (
        ["the storm", "the rain", "the forecast", "the heatwave", "the snowfall", "the fog",
         "the thunder", "the wind", "the frost", "the humidity"],
        ["the hurricane", "the drizzle", "the blizzard", "the monsoon", "the hailstorm"],
    ),
}
TEMPLATES = {
    "sports": (
        ["{w} scored in the final minute of the match", "{w} trained hard before the championship",
         "fans cheered for {w} at the stadium", "{w} was injured during the game",
         "{w} won the tournament after extra time", "{w} signed a new contract with the club",
         "{w} missed a penalty in the second half", "the league suspended {w} for two matches"],
        ["{w} broke the record at the olympics", "everyone watched {w} win the race on television",
         "{w} lost the title fight on points"],
    ),
    "cooking": (
        ["{w} needs more salt and a pinch of pepper", "{w} was simmered slowly for two hours",
         "{w} tasted delicious with fresh herbs", "add butter and garlic to {w}",
         "{w} was served hot with bread", "{w} burned because the heat was too high",
         "the kitchen smelled of {w} all afternoon", "stir {w} until it thickens"],
        ["{w} should be seasoned before roasting", "we grilled {w} with lemon and olive oil",
         "{w} came out of the kitchen perfectly cooked"],
    ),
    "technology": (
        ["{w} crashed after the latest patch", "{w} runs much faster with more memory",
         "engineers fixed a security bug in {w}", "{w} needs to be rebooted every night",
         "{w} supports the new wireless standard", "{w} lost the connection to the network",
         "developers released a new version of {w}", "{w} encrypts every file on the disk"],
        ["{w} overheated while rendering the video", "hackers exploited a flaw in {w}",
         "{w} synchronises data across devices"],
    ),
    "weather": (
        ["{w} is expected to hit the coast tonight", "{w} made the roads slippery this morning",
         "{w} will continue through the weekend", "farmers worried about {w} ruining the crops",
         "{w} brought cold air from the north", "{w} delayed flights at the airport",
         "meteorologists warned about {w}", "{w} cleared by the afternoon"],
        ["{w} flooded the streets of the city", "schools closed because of {w}",
         "{w} knocked down power lines across the region"],
    ),
}


@dataclass
class TopicsConfig:
    """Training settings: a linear head, full-batch Adam; seconds on a CPU."""

    steps: int = 300
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


def sentences(held_out: bool) -> tuple[list[str], np.ndarray]:
    """Every (template, word) sentence of each topic, training or held-out part, with its label index."""
    part = 1 if held_out else 0
    texts, labels = [], []
    for index, topic in enumerate(LABELS):
        for template, word in itertools.product(TEMPLATES[topic][part], WORDS[topic][part]):
            text = template.format(w=word)
            texts.append(text[0].upper() + text[1:] + ".")
            labels.append(index)
    order = list(range(len(texts)))
    random.Random(part).shuffle(order)  # mixed topics, so any batch of them mixes lengths too
    return [texts[i] for i in order], np.array([labels[i] for i in order], dtype=np.int64)


class TopicHead(nn.Module):
    """Sentence embedding [B, D] -> topic logits [B, len(LABELS)]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, len(LABELS))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.linear(embedding)


def embed(repository: Path, embedder: str, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Embeddings as the server computes them: the exported tokenizer step and encoder, in-process."""
    tokenizer_dir = repository / f"{embedder}_tokenizer"
    max_length = _config_max_length(tokenizer_dir / "config.pbtxt")
    tokenizer = TokenizerRuntime(tokenizer_dir / "1" / "tokenizer.json", max_length)
    session = encoder_session(repository, embedder)
    names = [t.name for t in session.inputs]
    out = []
    for start in range(0, len(texts), batch_size):
        batch = np.array([[t.encode()] for t in texts[start : start + batch_size]], dtype=object)
        tokens = dict(zip(names, tokenizer.run({"text": batch}, names), strict=True))
        out.append(session.run(tokens, ["embedding"])[0])
    return np.concatenate(out)


def encoder_session(repository: Path, embedder: str) -> ort_runtime.OnnxRuntimeSession:
    """An ONNX Runtime session of the embedding model's encoder step."""
    path = repository / f"{embedder}_encoder" / "1" / "model.onnx"
    return ort_runtime.OnnxRuntimeSession(path.read_bytes(), path.parent, ort_runtime.SessionOptions())


def _config_max_length(path: Path) -> int:
    from google.protobuf import text_format

    from server.schema import model_config_pb2 as mc

    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    return int(config.parameters["max_length"].string_value) if "max_length" in config.parameters else 0


def train(embeddings: np.ndarray, labels: np.ndarray, config: TopicsConfig) -> TopicHead:
    """Fits the head (deterministic for a seed)."""
    torch.manual_seed(config.seed)
    head = TopicHead(embeddings.shape[1])
    optimiser = torch.optim.Adam(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    x, y = torch.from_numpy(embeddings), torch.from_numpy(labels)
    for _ in range(config.steps):
        optimiser.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        optimiser.step()
    return head.eval()


def predict(head: TopicHead, embeddings: np.ndarray) -> np.ndarray:
    """The head's label indices in PyTorch."""
    with torch.no_grad():
        return head(torch.from_numpy(embeddings)).argmax(1).numpy()


def pipeline_config(name: str, embedder: str, inputs: list[str]) -> str:
    """The ensemble text -> tokenizer -> encoder -> head."""
    token_maps = "".join(f'input_map {{ key: "{n}" value: "{n}" }} ' for n in inputs)
    token_outputs = "".join(f'output_map {{ key: "{n}" value: "{n}" }} ' for n in inputs)
    return f"""
name: "{name}"
platform: "ensemble"
max_batch_size: 64
input {{ name: "text" data_type: TYPE_STRING dims: 1 }}
output {{ name: "logits" data_type: TYPE_FP32 dims: {len(LABELS)} label_filename: "labels.txt" }}
ensemble_scheduling {{
  step {{ model_name: "{embedder}_tokenizer" model_version: -1
          input_map {{ key: "text" value: "text" }} {token_outputs}}}
  step {{ model_name: "{embedder}_encoder" model_version: -1
          {token_maps}output_map {{ key: "embedding" value: "embedding" }} }}
  step {{ model_name: "{name}_head" model_version: -1
          input_map {{ key: "embedding" value: "embedding" }} output_map {{ key: "logits" value: "logits" }} }}
}}
"""


def build(repository: Path, embedder: str = "minilm", name: str = "topics") -> tuple[TopicHead, float]:
    """Trains the head on the embedder's embeddings and writes `<name>_head` and the ensemble `<name>`.

    The embedding model must already be in the repository (exporters.hf_encoder).

    Returns:
        The head and its held-out accuracy in PyTorch.
    """
    train_texts, train_labels = sentences(held_out=False)
    test_texts, test_labels = sentences(held_out=True)
    head = train(embed(repository, embedder, train_texts), train_labels, TopicsConfig())
    accuracy = float((predict(head, embed(repository, embedder, test_texts)) == test_labels).mean())
    dim = head.linear.in_features
    example = (torch.randn(2, dim, generator=torch.Generator().manual_seed(0)),)
    spec = ExportSpec(
        input_names=["embedding"], output_names=["logits"], dynamic_batching=True, labels=LABELS,
        label_output="logits", atol=1e-5,
    )
    export_torch(head, example, spec, repository, f"{name}_head")
    session = encoder_session(repository, embedder)
    write_ensemble(repository, name, pipeline_config(name, embedder, [t.name for t in session.inputs]), LABELS)
    return head, accuracy
