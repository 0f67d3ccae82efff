"""Build pissa/studies/resources/probe.jsonl: the knowledge-retention probe of `pissa compare`.

Cloze multiple-choice questions written for this project from the fact tables below (general
knowledge, science, language, arithmetic, Python), four options each (the answer and three
distractors drawn from the same table with a seeded generator). Each option is scored by
pissa.studies.forgetting's rule (the mean log-likelihood of its tokens after the question, as HellaSwag's
and ARC's normalised accuracy); the script keeps the questions the base model answers right, at
most PER_CATEGORY per category, so that the metric after fine-tuning is the share of the base
model's knowledge that survives.

    python scripts/make_probe.py [--model smollm2-135m] [--out pissa/studies/resources/probe.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

PER_CATEGORY = 40

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa",
    "Australia": "Canberra", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "Greece": "Athens", "Turkey": "Ankara", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "Ireland": "Dublin",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta", "Iran": "Tehran",
    "Iraq": "Baghdad", "Cuba": "Havana", "the Czech Republic": "Prague", "Romania": "Bucharest",
    "Scotland": "Edinburgh", "England": "London", "Saudi Arabia": "Riyadh", "the Philippines": "Manila",
    "New Zealand": "Wellington", "Iceland": "Reykjavik", "Venezuela": "Caracas", "Ethiopia": "Addis Ababa",
    "Ghana": "Accra", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Pakistan": "Islamabad",
    "Malaysia": "Kuala Lumpur", "Morocco": "Rabat", "Switzerland": "Bern", "Ukraine": "Kyiv",
}
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "phosphorus": "P", "sulfur": "S", "chlorine": "Cl",
    "potassium": "K", "calcium": "Ca", "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "gold": "Au",
    "mercury": "Hg", "lead": "Pb", "tin": "Sn", "uranium": "U", "neon": "Ne", "argon": "Ar", "nickel": "Ni",
    "platinum": "Pt", "iodine": "I", "fluorine": "F", "lithium": "Li",
}
ANIMALS = {
    "dog": "mammal", "cat": "mammal", "whale": "mammal", "dolphin": "mammal", "bat": "mammal", "horse": "mammal",
    "cow": "mammal", "elephant": "mammal", "eagle": "bird", "penguin": "bird", "sparrow": "bird", "owl": "bird",
    "parrot": "bird", "ostrich": "bird", "snake": "reptile", "lizard": "reptile", "crocodile": "reptile",
    "turtle": "reptile", "shark": "fish", "salmon": "fish", "trout": "fish", "tuna": "fish", "ant": "insect",
    "bee": "insect", "butterfly": "insect", "beetle": "insect", "mosquito": "insect", "frog": "amphibian",
    "toad": "amphibian", "salamander": "amphibian",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark", "open": "closed",
    "rich": "poor", "strong": "weak", "early": "late", "full": "empty", "wet": "dry", "hard": "soft",
    "high": "low", "long": "short", "loud": "quiet", "thick": "thin", "true": "false", "inside": "outside",
    "left": "right", "push": "pull", "buy": "sell", "love": "hate", "day": "night", "north": "south",
    "east": "west", "question": "answer", "win": "lose", "begin": "end", "heavy": "light",
}
PAST = {
    "go": "went", "eat": "ate", "see": "saw", "run": "ran", "write": "wrote", "take": "took", "give": "gave",
    "buy": "bought", "think": "thought", "swim": "swam", "sing": "sang", "drink": "drank", "speak": "spoke",
    "drive": "drove", "fly": "flew", "know": "knew", "begin": "began", "break": "broke", "choose": "chose",
    "fall": "fell", "forget": "forgot", "sleep": "slept", "teach": "taught", "catch": "caught",
    "bring": "brought", "find": "found", "build": "built", "sell": "sold", "tell": "told", "feel": "felt",
}
PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "goose": "geese", "person": "people", "ox": "oxen", "leaf": "leaves", "knife": "knives", "wolf": "wolves",
    "box": "boxes", "city": "cities", "baby": "babies", "bus": "buses", "cactus": "cacti", "half": "halves",
    "wife": "wives", "church": "churches",
}
FACTS = [  # (question, answer, distractors)
    ("The largest planet in the Solar System is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("The planet closest to the Sun is", "Mercury", ["Jupiter", "Saturn", "Neptune"]),
    ("The Earth orbits the", "Sun", ["Moon", "Mars", "Pole Star"]),
    ("Water is made of hydrogen and", "oxygen", ["helium", "carbon", "iron"]),
    ("Plants make their food by", "photosynthesis", ["digestion", "evaporation", "magnetism"]),
    ("The human heart pumps", "blood", ["air", "sand", "bile"]),
    ("A triangle has", "three sides", ["four sides", "five sides", "six sides"]),
    ("A hexagon has", "six sides", ["three sides", "four sides", "eight sides"]),
    ("There are seven days in a", "week", ["month", "year", "decade"]),
    ("There are twelve months in a", "year", ["week", "day", "minute"]),
    ("A century is a period of one hundred", "years", ["days", "weeks", "minutes"]),
    ("There are sixty minutes in an", "hour", ["year", "week", "month"]),
    ("There are twenty-four hours in a", "day", ["year", "minute", "century"]),
    ("There are one thousand metres in a", "kilometre", ["centimetre", "millimetre", "gram"]),
    ("Romeo and Juliet was written by William", "Shakespeare", ["Wordsworth", "Blake", "Golding"]),
    ("The Mona Lisa was painted by Leonardo da", "Vinci", ["Silva", "Costa", "Souza"]),
    ("The chemical formula of water is", "H2O", ["CO2", "NaCl", "O3"]),
    ("The gas that plants take in from the air is carbon", "dioxide", ["monoxide", "fibre", "copy"]),
    ("The colour of a clear daytime sky is", "blue", ["green", "red", "brown"]),
    ("The colour of fresh grass is", "green", ["blue", "purple", "orange"]),
    ("The colour of snow is", "white", ["black", "green", "red"]),
    ("A ripe banana is", "yellow", ["blue", "purple", "black"]),
    ("The opposite of north is", "south", ["east", "west", "up"]),
    ("The freezing point of water at sea level is 0 degrees", "Celsius", ["Newton", "Pascal", "Joule"]),
    ("The force that pulls objects towards the Earth is", "gravity", ["friction", "magnetism", "inertia"]),
    ("The closest star to the Earth is the", "Sun", ["Moon", "Mars", "Sirius"]),
    ("Bees make", "honey", ["milk", "silk", "wool"]),
    ("Cows give us", "milk", ["honey", "silk", "eggs"]),
    ("The largest ocean on Earth is the", "Pacific Ocean", ["Indian Ocean", "Arctic Ocean", "Atlantic Ocean"]),
    ("The longest river in Africa is the", "Nile", ["Thames", "Seine", "Danube"]),
    ("The tallest mountain on Earth is Mount", "Everest", ["Kilimanjaro", "Fuji", "Etna"]),
    ("The currency of Japan is the", "yen", ["euro", "peso", "rupee"]),
    ("The currency of the United Kingdom is the pound", "sterling", ["dollar", "franc", "euro"]),
    ("Ice is water in its", "solid", ["liquid", "gaseous", "plasma"]),
    ("Steam is water in its", "gaseous", ["solid", "frozen", "crystal"]),
    ("The study of living things is called", "biology", ["geology", "astronomy", "grammar"]),
    ("The study of the stars and planets is called", "astronomy", ["biology", "botany", "zoology"]),
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("A baby dog is called a", "puppy", ["kitten", "lamb", "cub"]),
    ("The organ we use to breathe is the", "lungs", ["liver", "kidneys", "stomach"]),
]
PYTHON = [
    ("In Python, the keyword that defines a function is", "def", ["func", "function", "fn"]),
    ("In Python, the keyword that defines a class is", "class", ["struct", "object", "type"]),
    ("In Python, the built-in function that returns the length of a list is", "len", ["size", "count", "length"]),
    ("In Python, the built-in function that prints to the screen is", "print", ["echo", "write", "say"]),
    ("In Python, the value of 2 ** 3 is", "8", ["6", "9", "5"]),
    ("In Python, the value of 7 // 2 is", "3", ["3.5", "4", "2"]),
    ("In Python, the value of 10 % 3 is", "1", ["3", "0", "2"]),
    ("In Python, a comment starts with the character", "#", ["%", "@", "$"]),
    ("In Python, the keyword that imports a module is", "import", ["include", "require", "using"]),
    ("In Python, the boolean values are True and", "False", ["Nil", "Never", "Null"]),
    ("In Python, the value that means nothing is", "None", ["Null", "Nil", "Void"]),
    ("In Python, the keyword that starts a loop over a sequence is", "for", ["each", "loop", "over"]),
    ("In Python, the keyword that handles exceptions together with try is", "except", ["catch", "rescue", "handle"]),
    ("In Python, the method that adds an item to the end of a list is", "append", ["push", "add", "insert_end"]),
    ("In Python, the keyword that returns a value from a function is", "return", ["give", "yield_value", "out"]),
    ("In Python, the built-in type of 3.14 is", "float", ["int", "str", "bool"]),
    ("In Python, the built-in type of 'hello' is", "str", ["int", "float", "list"]),
    ("In Python, len('abc') returns", "3", ["2", "4", "1"]),
    ("In Python, the operator that tests for equality is", "==", ["=", "=>", "<>"]),
    ("In Python, the statement that does nothing is", "pass", ["skip", "noop", "nothing"]),
]


def cloze(question: str, answer: str, distractors: list[str], rng, category: str) -> dict:
    options = [answer] + list(distractors)
    order = rng.permutation(len(options))
    return {"question": question, "options": [" " + options[i] for i in order],
            "answer": int(np.argmax(order == 0)), "category": category}


def from_table(table: dict, template: str, category: str, rng, k: int = 3) -> list[dict]:
    values = sorted(set(table.values()))
    out = []
    for key, answer in table.items():
        others = [v for v in values if v != answer]
        picks = list(rng.choice(others, size=min(k, len(others)), replace=False))
        out.append(cloze(template.format(key), answer, picks, rng, category))
    return out


def candidates(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    items = from_table(CAPITALS, "The capital of {} is", "capitals", rng)
    items += from_table(SYMBOLS, "The chemical symbol for {} is", "chemistry", rng)
    items += from_table(ANIMALS, "A {} is a kind of", "animals", rng)
    items += from_table(OPPOSITES, "The opposite of {} is", "opposites", rng)
    items += from_table(PAST, "The past tense of the verb to {} is", "grammar", rng)
    items += from_table(PLURALS, "The plural of {} is", "grammar", rng)
    items += [cloze(q, a, d, rng, "facts") for q, a, d in FACTS]
    items += [cloze(q, a, d, rng, "python") for q, a, d in PYTHON]
    for a, b in [(int(x), int(y)) for x, y in rng.integers(2, 10, size=(40, 2))]:
        wrong = sorted({a * b + d for d in (-a, a, 1, -1, b, -b, 10)} - {a * b} - {x for x in range(-99, 1)})
        items.append(cloze(f"{a} times {b} equals", str(a * b), [str(w) for w in rng.choice(wrong, 3, replace=False)],
                           rng, "arithmetic"))
    return items


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "pissa/studies/resources/probe.jsonl"))
    args = p.parse_args()
    from pissa.studies import forgetting
    from pissa.jobs.init import run_init
    from pissa.adapters.spec import AdapterSpec
    from pissa.studies.evaluate import Session

    items = candidates()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        run_init(args.model, base, AdapterSpec(init="full"), progress=False)   # the model as a plain folder
        session = Session("torch", base, device="cpu")
        tokenizer = session.tokenizer
        examples = forgetting.probe_examples(tokenizer, items)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sums, counts = [], []
        for batch in forgetting.batches(examples, 32, pad):
            nll, _, count = session.token_stats(batch)
            sums += list(-nll)
            counts += list(count)
    scores = forgetting.option_scores(items, np.array(sums), np.array(counts))
    kept, per_category = [], {}
    for item, s in zip(items, scores):
        right = int(np.argmax(s)) == item["answer"]
        per_category.setdefault(item["category"], [0, 0])
        per_category[item["category"]][1] += 1
        if right and per_category[item["category"]][0] < PER_CATEGORY:
            per_category[item["category"]][0] += 1
            kept.append(item)
    with open(args.out, "w", encoding="utf-8") as f:
        for item in kept:
            f.write(json.dumps(item) + "\n")
    for cat, (k, n) in sorted(per_category.items()):
        print(f"{cat}: kept {k} of {n}")
    print(f"{len(kept)} of {len(items)} questions the base model answers right -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
