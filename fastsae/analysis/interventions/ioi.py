"""Indirect-object identification (IOI), built in: the task of Wang et al. 2022 ("Interpretability in the
Wild", arXiv:2211.00593), where a model completes

    "When Mary and John went to the store, John gave a drink to"  ->  " Mary"

naming the indirect object (IO, Mary) rather than the repeated subject (S, John). Gemma 3 270M does it:
logit(IO) - logit(S) is 3-5 nats on these prompts.

    prompts = ioi.generate(tokenizer, n=100, seed=0)
    prompts.clean, prompts.corrupted        # PromptBatch each (left-padded), aligned column by column
    ld = ioi.logit_diff(last_logits(model, prompts.clean), prompts)    # (B,) logit(IO) - logit(S)

Templates are the 15 of Wang et al. (their BABA set; ABBA swaps the first two names), half the prompts in
each order, exactly. Names, places and objects are theirs too; a name is used only when it is one token for
the tokenizer, both at the start of a word (" Mary") and as the answer, so IO and S are single next tokens.
The corrupted twin replaces the second mention of S by a third name C ("..., Alice gave a drink to"): the
prompt keeps its length and every token but one, and no longer says which of IO and S is the answer
(Wang et al.'s ABC distribution, here changing S2 only so that clean and corrupted stay aligned).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .padded_prompts import PromptBatch, encode, pad_id

# Wang et al. 2022, BABA_TEMPLATES of their ioi_dataset.py: [A] is the IO, [B] the subject S.
TEMPLATES = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to",
)
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda", "Daniel", "David",
    "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason", "Justin", "Sarah", "William",
    "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony", "Heather", "Eric", "Elizabeth", "Adam",
    "Megan", "Melissa", "Kevin", "Steven", "Thomas", "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren",
    "Amber", "Brittany", "Danielle", "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany",
    "Jeremy", "Benjamin", "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean",
    "Erin", "Zachary", "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler",
    "Scott", "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan", "Lindsey",
    "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa", "Courtney", "Christine",
    "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)


@dataclass
class IOIPrompts:
    texts: list[str]  # the clean prompts, without the answer
    corrupted_texts: list[str]  # the same with S2 replaced by a third name
    clean: PromptBatch  # (B, T) left-padded
    corrupted: PromptBatch  # (B, T), same columns as clean
    io_ids: Tensor  # (B,) token id of " IO", the answer
    s_ids: Tensor  # (B,) token id of " S"
    orders: list[str]  # "ABBA" or "BABA" per prompt
    templates: list[int]  # index into TEMPLATES per prompt
    names: list[tuple[str, str, str]] = field(default_factory=list)  # (IO, S, C) per prompt

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, rows: slice) -> IOIPrompts:
        if not isinstance(rows, slice):
            raise TypeError("IOIPrompts can be sliced (prompts[:50]), not indexed")
        return IOIPrompts(self.texts[rows], self.corrupted_texts[rows], self.clean[rows], self.corrupted[rows],
                          self.io_ids[rows], self.s_ids[rows], self.orders[rows], self.templates[rows],
                          self.names[rows])


def single_token_names(tokenizer, names=NAMES) -> list[str]:
    """The names that are one token, not the unknown token, for this tokenizer after a space."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for name in names:
        ids = tokenizer.encode(" " + name, add_special_tokens=False)
        if len(ids) == 1 and ids[0] != unk:
            out.append(name)
    return out


def _token(tokenizer, word: str) -> int:
    return tokenizer.encode(" " + word, add_special_tokens=False)[0]


def generate(tokenizer, n: int = 100, seed: int = 0, names=NAMES, templates=TEMPLATES) -> IOIPrompts:
    """n IOI prompts and their corrupted twins, half ABBA and half BABA (the first of an odd n is ABBA),
    templates, places, objects and names drawn with random.Random(seed)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    usable = single_token_names(tokenizer, names)
    if len(usable) < 3:
        raise ValueError(f"IOI needs at least 3 names that are single tokens for this tokenizer (after a space); "
                         f"found {len(usable)} of {len(names)}: {usable}")
    rng = random.Random(seed)
    texts, corrupted, orders, used, rows, rows_c, triples = [], [], [], [], [], [], []
    io_ids, s_ids = [], []
    while len(texts) < n:
        order = "ABBA" if len(texts) % 2 == 0 else "BABA"
        t = rng.randrange(len(templates))
        io, s, c = rng.sample(usable, 3)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        first, second = (io, s) if order == "ABBA" else (s, io)
        text = _fill(templates[t], place, obj, first, second, s)
        text_c = _fill(templates[t], place, obj, first, second, c)
        ids, ids_c = encode(tokenizer, text), encode(tokenizer, text_c)
        # a name merged with a neighbouring token: not a clean twin, draw again
        if len(ids) != len(ids_c) or sum(a != b for a, b in zip(ids, ids_c, strict=True)) != 1:
            continue
        texts.append(text)
        corrupted.append(text_c)
        orders.append(order)
        used.append(t)
        rows.append(ids)
        rows_c.append(ids_c)
        triples.append((io, s, c))
        io_ids.append(_token(tokenizer, io))
        s_ids.append(_token(tokenizer, s))
    pad = pad_id(tokenizer)
    return IOIPrompts(texts, corrupted, PromptBatch.from_ids(rows, pad), PromptBatch.from_ids(rows_c, pad),
                      torch.tensor(io_ids), torch.tensor(s_ids), orders, used, triples)


def _fill(template: str, place: str, obj: str, first: str, second: str, s2: str) -> str:
    """BABA templates name [B] twice: the first mention is the first name of the pair, the second is S2."""
    text = template.replace("[PLACE]", place).replace("[OBJECT]", obj)
    b1 = text.index("[B]")
    text = text[:b1] + first + text[b1 + 3:]
    text = text.replace("[A]", second, 1)
    return text.replace("[B]", s2, 1)


def logit_diff(logits: Tensor, prompts: IOIPrompts) -> Tensor:
    """(B,) logit(IO) - logit(S) from next-token logits (B, V) at each prompt's last token."""
    if logits.dim() != 2 or logits.shape[0] != len(prompts):
        raise ValueError(f"logits must be (batch={len(prompts)}, vocab), got {tuple(logits.shape)}")
    io, s = prompts.io_ids.to(logits.device), prompts.s_ids.to(logits.device)
    return logits.gather(1, io[:, None])[:, 0] - logits.gather(1, s[:, None])[:, 0]


def vocabulary() -> list[str]:
    """Every word and punctuation mark the generator can write (for word-level test tokenizers)."""
    words = {w for t in TEMPLATES for w in t.replace(",", " , ").replace(".", " . ").split() if "[" not in w}
    return sorted(words | set(PLACES) | set(OBJECTS) | set(NAMES) | {",", "."})
