"""The offline pretraining corpus: simple English, numbers and their comparison, and page-like text (listings,
search results, option lists with prices), generated from templates and a hand-written vocabulary.

    documents = generate_documents(1000, seed=0)

Every document is one of three kinds, drawn with ``KIND_WEIGHTS``: ``language`` (a short paragraph about one
person, facts about categories, questions and answers), ``numbers`` (comparisons, sorting, "under $40", sums and
differences) and ``page`` (a store page: a listing, a product page, a budget note).

Nothing here comes from the web shop (``envs/web_shop.py``): its product types, attributes, brands, unit-valued
options, goal instructions, page layout and action grammar (``search[...]``, ``click[...]``) are absent by
construction and tests/test_pretrain.py checks it. Generic words overlap by design: colours, ``small`` /
``medium`` / ``large``, numbers, prices written ``$12.34``, ``Price: $12.34``, and words such as ``price``, ``color``,
``size``, ``need``, ``dollars``, ``with``.
"""

from __future__ import annotations

import random

# --- vocabulary -------------------------------------------------------------------------------------------------
NAMES = {
    "she": "Ada Cara Eva Gina Iris Kate Maya Olga Rosa Tara Vera Xena Zara Alma Clara Elsa Greta Ines Kira Mona "
           "Nora Petra Sonia Una Wanda".split(),
    "he": "Ben Dan Finn Hugo Jon Liam Nils Paul Quinn Saul Umar Wes Yuri Boris Dario Felix Hans Jamal Lars Oscar "
          "Rafael Theo Viktor Omar Ivan".split(),
}
PRONOUNS = {"she": ("she", "her"), "he": ("he", "his")}
CATEGORIES: dict[str, list[str]] = {
    "animal": "cat dog horse rabbit sheep goat cow pig duck goose owl eagle crow fox wolf bear deer mouse squirrel "
              "frog turtle snake lizard whale dolphin seal otter beaver badger hedgehog tiger lion zebra giraffe "
              "camel donkey parrot pigeon swan crab".split(),
    "fruit": "apple pear plum cherry grape lemon orange peach banana mango melon kiwi fig apricot lime "
             "strawberry raspberry blueberry coconut pineapple".split(),
    "vegetable": "carrot potato onion garlic pepper tomato cabbage lettuce pea bean turnip radish pumpkin "
                 "cucumber spinach leek celery beet corn".split(),
    "tool": "hammer saw drill wrench shovel rake ladder axe chisel screwdriver spade trowel file "
            "clamp".split(),
    "instrument": "piano violin flute drum harp trumpet cello guitar banjo oboe tuba clarinet".split(),
    "vehicle": "car bus train truck tram bicycle boat ship plane scooter tractor van canoe".split(),
    "building": "house barn tower castle school library museum church bakery factory station hospital "
                "cottage".split(),
    "place": "park river lake forest hill valley beach island village city market garden meadow harbour "
             "field road bridge square".split(),
    "food": "bread soup cheese rice pasta cake pie salad butter honey jam porridge noodle pancake".split(),
    "weather": "rain snow wind fog storm sunshine frost hail thunder".split(),
    "job": "baker farmer teacher doctor nurse pilot sailor painter writer singer tailor miner builder "
           "gardener cook driver judge".split(),
}
THINGS = [noun for c in ("fruit", "vegetable", "tool", "instrument", "food") for noun in CATEGORIES[c]] + (
    "book letter key coin stone shell feather rope basket box chair table door window clock map ticket "
    "candle lantern kite ball bell button ribbon mirror blanket pillow painting photo song story puzzle "
    "game gift cup plate spoon fork knife bowl jar bottle bucket net flag tent sail wheel").split()
"""Things a person can carry, find or make (the objects of the story sentences)."""
ADJECTIVES = ("old young tall short big little quiet loud bright dark warm cold soft hard heavy light fast slow "
              "happy sad brave shy clever kind gentle proud calm busy lazy strong weak clean dirty empty full "
              "rich poor sweet sour fresh stale wet dry early late sharp dull round square smooth rough thin "
              "thick wide narrow deep shallow huge tiny strange famous simple plain fancy noisy silent hungry "
              "sleepy curious careful friendly polite rude lucky funny serious wild tame golden silver wooden "
              "ancient modern gentle patient honest cheerful lonely tired eager").split()
COLORS = "red orange yellow green blue purple pink brown black white grey navy olive cream teal".split()
VERBS = [tuple(forms.split()) for forms in (  # base, third person, past
    "walk walks walked, run runs ran, jump jumps jumped, swim swims swam, sing sings sang, read reads read, "
    "write writes wrote, paint paints painted, cook cooks cooked, bake bakes baked, build builds built, "
    "fix fixes fixed, find finds found, lose loses lost, carry carries carried, open opens opened, "
    "close closes closed, clean cleans cleaned, wash washes washed, draw draws drew, visit visits visited, "
    "watch watches watched, help helps helped, follow follows followed, count counts counted, "
    "climb climbs climbed, plant plants planted, pick picks picked, throw throws threw, catch catches caught, "
    "bring brings brought, sell sells sold, buy buys bought, borrow borrows borrowed, hide hides hid, "
    "fold folds folded, mend mends mended, share shares shared, study studies studied, "
    "measure measures measured, sort sorts sorted, weigh weighs weighed, pack packs packed, "
    "deliver delivers delivered").split(", ")]
PLACE_PHRASES = ("near the {p}", "by the {p}", "in the {p}", "across the {p}", "behind the {p}", "at the {p}",
                 "beside the {p}", "past the {p}")
TIMES = ("morning", "evening", "afternoon", "night", "day", "week", "spring", "summer", "autumn", "winter")
ADVERBS = ("slowly quickly quietly loudly carefully happily sadly gently calmly proudly softly bravely "
           "patiently eagerly").split()
FEELINGS = ("glad", "tired", "proud", "worried", "calm", "excited", "surprised", "hungry", "sleepy", "curious")

# Page-like text: goods, materials, makers and option groups of their own (none of the web shop's).
GOODS = ("teapot notebook scarf wallet candle pillow blanket toaster kettle keyboard sunglasses belt gloves "
         "jacket rug tent helmet skateboard flashlight speaker webcam charger bookshelf stool doormat apron "
         "vase teaspoon whisk colander planter birdhouse hammock raincoat beanie cardigan journal stapler "
         "calculator binoculars compass thermos lunchbox jigsaw").split() + [
    "picture frame", "cutting board", "frying pan", "flower pot", "sleeping bag", "pencil case", "garden hose",
    "bicycle bell", "dog leash", "cat bed", "bird feeder", "alarm clock", "tablet stand", "wall clock",
    "bath towel", "tea towel", "salad bowl", "coffee grinder", "baking tray", "wine glass"]
MATERIALS = ("wooden glass bamboo wool silk linen recycled vintage oak pine walnut copper brass "
             "marble clay felt canvas rattan wicker hemp velvet suede denim porcelain enamel").split()
FEATURES = ("hand woven", "solar powered", "battery powered", "rechargeable", "scented", "unscented",
            "reversible", "stackable", "washable", "portable", "adjustable height", "quick dry", "fire resistant",
            "child safe", "scratch resistant", "glow in the dark", "easy clean", "heat resistant", "two tone")
MAKERS = ("brightway kestrel maplewood orion solace tundra zephyr halcyon juniper nimbus larkspur cobalt "
          "ridgeline saffron wren bluefield harbor pinecrest").split()
OPTION_GROUPS: dict[str, list[str]] = {
    "finish": ["matte", "glossy", "satin", "brushed"],
    "pack": ["single", "pair", "set of 3", "set of 6"],
    "width": ["40 cm", "60 cm", "80 cm", "100 cm"],
    "weight": ["250 g", "500 g", "1 kg", "2 kg"],
    "style": ["classic", "modern", "rustic", "minimal"],
    "color": COLORS[:10],
    "size": ["small", "medium", "large", "extra large"],
}
KIND_WEIGHTS = {"language": 0.5, "numbers": 0.2, "page": 0.3}


# --- helpers ----------------------------------------------------------------------------------------------------
def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def price(rng: random.Random, low: float = 2.0, high: float = 150.0) -> float:
    return round(rng.uniform(low, high), 2)


def money(value: float) -> str:
    return f"${value:.2f}"


# --- language ---------------------------------------------------------------------------------------------------
def story_paragraph(rng: random.Random) -> str:
    """A few sentences about one person: the same name and pronoun throughout, events in order."""
    pronoun = rng.choice(list(PRONOUNS))
    subject, possessive = PRONOUNS[pronoun]
    name = rng.choice(NAMES[pronoun])
    friend = rng.choice([n for names in NAMES.values() for n in names if n != name])
    place, other_place = rng.sample(CATEGORIES["place"], 2)
    thing = rng.choice(THINGS)
    adjective = rng.choice(ADJECTIVES)
    job = rng.choice(CATEGORIES["job"])
    verb, other = rng.sample(VERBS, 2)
    pool = [
        f"{name} was {article(rng.choice(ADJECTIVES))} {job} who lived {rng.choice(PLACE_PHRASES).format(p=place)}.",
        f"Every {rng.choice(TIMES)}, {subject} {verb[1]} {rng.choice(ADVERBS)} "
        f"{rng.choice(PLACE_PHRASES).format(p=other_place)}.",
        f"One day {name} {other[2]} {article(adjective)} {thing} with {friend}.",
        f"The {thing} was {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}.",
        f"{friend} {rng.choice(VERBS)[2]} the {rng.choice(THINGS)} for {name} and felt {rng.choice(FEELINGS)}.",
        f"{name} took {possessive} {rng.choice(THINGS)} to the {rng.choice(CATEGORIES['building'])}.",
        f"When the {rng.choice(CATEGORIES['weather'])} came, {subject} stayed at home and {rng.choice(VERBS)[2]} "
        f"{article(rng.choice(THINGS))}.",
        f"Later, {name} and {friend} {rng.choice(VERBS)[2]} {rng.randint(2, 12)} {plural(rng.choice(THINGS))} "
        f"{rng.choice(PLACE_PHRASES).format(p=rng.choice(CATEGORIES['place']))}.",
        f"{name} needed {article(rng.choice(THINGS))} and had {rng.randint(2, 60)} dollars to spend.",
        f"{friend} wanted {article(rng.choice(COLORS))} {rng.choice(THINGS)} with {article(rng.choice(ADJECTIVES))} "
        f"{rng.choice(THINGS)} inside.",
        f"In the end, {subject} was {rng.choice(FEELINGS)}, and the {thing} stayed {rng.choice(ADJECTIVES)}.",
    ]
    keep = sorted(rng.sample(range(1, len(pool) - 1), rng.randint(2, 5)))
    return " ".join([pool[0], *(pool[i] for i in keep), pool[-1]])


def category_facts(rng: random.Random) -> str:
    """True statements and questions about which category a word belongs to."""
    sentences = []
    for _ in range(rng.randint(3, 6)):
        category = rng.choice(list(CATEGORIES))
        noun = rng.choice(CATEGORIES[category])
        other = rng.choice([c for c in CATEGORIES if c != category])
        form = rng.randrange(4)
        if form == 0:
            sentences.append(f"{article(noun).capitalize()} is a kind of {category}.")
        elif form == 1:
            sentences.append(f"Question: Is {article(noun)} {article(other)}? Answer: No, it is {article(category)}.")
        elif form == 2:
            sentences.append(f"Question: Is {article(noun)} {article(category)}? Answer: Yes.")
        else:
            members = rng.sample(CATEGORIES[category], min(3, len(CATEGORIES[category])))
            sentences.append(f"{', '.join(plural(m) for m in members[:-1]).capitalize()} and {plural(members[-1])} "
                             f"are all {plural(category)}.")
    return " ".join(sentences)


def language_document(rng: random.Random) -> str:
    return story_paragraph(rng) if rng.random() < 0.7 else category_facts(rng)


# --- numbers ----------------------------------------------------------------------------------------------------
def number_fact(rng: random.Random) -> str:
    """One statement about numbers or prices, true by construction."""
    form = rng.randrange(7)
    if form == 0:
        a, b = rng.sample(range(0, 1000), 2)
        word = rng.choice([("greater", "less"), ("larger", "smaller"), ("more", "fewer")])
        return f"{max(a, b)} is {word[0]} than {min(a, b)}, and {min(a, b)} is {word[1]} than {max(a, b)}."
    if form == 1:
        a, b = price(rng), price(rng)
        low, high = sorted((a, b))
        return f"Which price is lower, {money(a)} or {money(b)}? {money(low)} is lower." if a != b else \
            f"{money(a)} and {money(b)} are the same amount."
    if form == 2:
        values = rng.sample(range(1, 500), rng.randint(3, 6))
        order = rng.choice(["lowest to highest", "highest to lowest"])
        ordered = sorted(values, reverse=order.startswith("highest"))
        return f"Sorted from {order}, {', '.join(map(str, values))} become {', '.join(map(str, ordered))}."
    if form == 3:
        limit = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 100, 120])
        value = price(rng, 1, limit * 2)
        word = rng.choice(["under", "below", "less than"])
        if value <= limit:
            return f"{money(value)} is {word} ${limit}, so it fits a budget of ${limit}."
        return f"{money(value)} is not {word} ${limit}: it is {money(value - limit)} over a budget of ${limit}."
    if form == 4:
        prices = [price(rng) for _ in range(rng.randint(3, 5))]
        pick = rng.choice(["cheapest", "most expensive"])
        best = min(prices) if pick == "cheapest" else max(prices)
        return f"Of {', '.join(map(money, prices))}, the {pick} is {money(best)}."
    if form == 5:
        a, b = rng.randint(0, 500), rng.randint(0, 500)
        return f"{a} plus {b} is {a + b}, and {max(a, b)} minus {min(a, b)} is {max(a, b) - min(a, b)}."
    count, unit = rng.randint(2, 9), price(rng, 1, 30)
    return f"{count} items at {money(unit)} each cost {money(round(count * unit, 2))} in total."


def numbers_document(rng: random.Random) -> str:
    return " ".join(number_fact(rng) for _ in range(rng.randint(3, 6)))


# --- page-like text ---------------------------------------------------------------------------------------------
def make_item(rng: random.Random) -> dict:
    """A store item of the corpus's own goods: name, price and two option groups."""
    groups = rng.sample(sorted(OPTION_GROUPS), 2)
    return {
        "name": f"{rng.choice(MAKERS).capitalize()} {rng.choice(MATERIALS)} {rng.choice(GOODS)}",
        "price": price(rng),
        "feature": rng.choice(FEATURES),
        "options": {g: sorted(rng.sample(OPTION_GROUPS[g], rng.randint(2, 3))) for g in groups},
        "stock": rng.randint(0, 40),
    }


def listing_page(rng: random.Random) -> str:
    """A catalog listing, optionally filtered by a price limit, with its cheapest entry named."""
    good = rng.choice(GOODS)
    items = [make_item(rng) | {"name": f"{rng.choice(MAKERS).capitalize()} {rng.choice(MATERIALS)} {good}"}
             for _ in range(rng.randint(3, 7))]
    lines = [f"Catalog page {rng.randint(1, 9)} of {rng.randint(9, 30)}",
             f'Showing {len(items)} items for "{good}"']
    lines += [f"{i}. {item['name']} - {money(item['price'])} - rating {rng.randint(10, 50) / 10:.1f} of 5"
              for i, item in enumerate(items, 1)]
    cheapest = min(items, key=lambda item: item["price"])
    lines.append(f"Cheapest: {cheapest['name']} at {money(cheapest['price'])}")
    if rng.random() < 0.6:
        limit = rng.choice([10, 20, 25, 30, 40, 50, 75, 100])
        fits = [item for item in items if item["price"] <= limit]
        matching = "; ".join(f"{x['name']} {money(x['price'])}" for x in fits)
        lines.append(f"Filter: price under ${limit}. " + (f"Matching: {matching}." if fits else "Nothing matches."))
    return "\n".join(lines)


def product_page(rng: random.Random) -> str:
    """One item's page: price (sometimes reduced), feature, option lists with prices, stock."""
    item = make_item(rng)
    lines = [f"Product: {item['name']}"]
    if rng.random() < 0.3:
        was = round(item["price"] * rng.uniform(1.1, 1.8), 2)
        lines.append(f"Price: {money(item['price'])} (was {money(was)}, you save {money(was - item['price'])})")
    else:
        lines.append(f"{rng.choice(['Price', 'Cost'])}: {money(item['price'])}")
    lines.append(f"Details: {item['feature']}")
    for group, values in item["options"].items():
        extras = [0.0] + [round(rng.uniform(0.5, 15), 2) for _ in values[1:]]
        priced = ", ".join(f"{v} ({money(item['price'] + e)})" for v, e in zip(values, extras))
        lines.append(f"Choose {group}: {priced}")
    lines.append(f"In stock: {item['stock']}" if item["stock"] else "Out of stock")
    return "\n".join(lines)


def budget_note(rng: random.Random) -> str:
    """A shopper's note: which of a few items fit a budget, and the total of those that do."""
    limit = rng.choice([15, 20, 30, 40, 50, 60, 80, 100])
    items = [make_item(rng) for _ in range(rng.randint(2, 4))]
    lines = [f"Budget: ${limit} per item."]
    for item in items:
        verdict = "fits the budget" if item["price"] <= limit else f"is {money(item['price'] - limit)} too much"
        lines.append(f"The {item['name']} costs {money(item['price'])}, which {verdict}.")
    fits = [item["price"] for item in items if item["price"] <= limit]
    lines.append(f"Items that fit: {len(fits)}; together they cost {money(round(sum(fits), 2))}.")
    return " ".join(lines)


def shopping_request(rng: random.Random) -> str:
    """A shopper's request (a material, an option, a price limit), a few offers, and which of them fit it."""
    good, material = rng.choice(GOODS), rng.choice(MATERIALS)
    group = rng.choice(sorted(OPTION_GROUPS))
    value, limit = rng.choice(OPTION_GROUPS[group]), rng.choice([10, 15, 20, 30, 40, 50, 70, 90, 120])
    lines = [f"Request: I need {article(material)} {good} with {group} {value}, and I want to pay less than "
             f"{limit} dollars."]
    offers = []
    for _ in range(rng.randint(2, 4)):
        cost = price(rng, 0.4 * limit, 1.6 * limit)  # about half the offers are under the limit
        offer_material = material if rng.random() < 0.6 else rng.choice(MATERIALS)
        values = sorted(set(rng.sample(OPTION_GROUPS[group], 2)) | ({value} if rng.random() < 0.6 else set()))
        name = f"{rng.choice(MAKERS).capitalize()} {offer_material} {good}"
        offers.append((name, offer_material, values, cost))
        lines.append(f"Offer: {name}, {group} {' or '.join(values)}, {money(cost)}.")
    fits = [name for name, m, values, cost in offers if m == material and value in values and cost < limit]
    lines.append(f"Fits the request: {'; '.join(fits)}." if fits else "Nothing fits the request.")
    return " ".join(lines)


def page_document(rng: random.Random) -> str:
    return rng.choice((listing_page, product_page, budget_note, shopping_request))(rng)


# --- the corpus -------------------------------------------------------------------------------------------------
KINDS = {"language": language_document, "numbers": numbers_document, "page": page_document}


def generate_documents(count: int, seed: int = 0) -> list[str]:
    """``count`` documents, each of a kind drawn with ``KIND_WEIGHTS``; the same for the same arguments."""
    rng = random.Random(seed)
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=count)
    return [KINDS[kind](rng) for kind in kinds]
