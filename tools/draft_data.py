"""Prompts for building (and evaluating) the embedded draft model (declab/draft.py).

The draft is distilled from the target's own answers to these chat prompts. Training and held-out prompts use
disjoint topic lists (and held-out-only standalone prompts), so the held-out agreement measures generalisation to
new subjects, not memorised answers. Everything here is deterministic (fixed seed).
"""

from __future__ import annotations

import random

TEMPLATES = (
    "Explain {t} in simple terms.",
    "Write a short poem about {t}.",
    "Give me three interesting facts about {t}.",
    "What are the pros and cons of {t}?",
    "Write a short story that involves {t}.",
    "How would you explain {t} to a ten-year-old?",
    "Summarize the history of {t} in one paragraph.",
    "Write a tweet about {t}.",
    "What are common misconceptions about {t}?",
    "Describe {t} in two sentences.",
    "Why is {t} important?",
    "Write a haiku about {t}.",
    "List five questions a student might ask about {t}.",
    "Give me a fun quiz question about {t} with the answer.",
    "What should a beginner know about {t}?",
    "Write a short dialogue between two friends discussing {t}.",
    "Compare {t} with something from everyday life.",
    "What is the future of {t}?",
    "Write an opening paragraph for an essay on {t}.",
    "Tell me a joke about {t}.",
    "What would happen if {t} disappeared tomorrow?",
    "Write a product description inspired by {t}.",
    "Give me a step-by-step guide to learning about {t}.",
    "What is {t}?",
    "Write a motivational message that mentions {t}.",
    "Describe a typical day for someone who works with {t}.",
    "Write a limerick about {t}.",
    "Explain how {t} works.",
)

TRAIN_TOPICS = (
    "the water cycle", "photosynthesis", "black holes", "the French Revolution", "machine learning",
    "climate change", "the stock market", "vaccines", "volcanoes", "the internet", "democracy", "coffee",
    "the Roman Empire", "recycling", "sleep", "exercise", "chess", "jazz music", "honey bees", "the moon",
    "electric cars", "the human heart", "rainbows", "earthquakes", "the printing press", "solar panels",
    "friendship", "time management", "dinosaurs", "the ocean", "gravity", "cooking pasta", "public speaking",
    "the immune system", "cryptography", "social media", "the Olympic Games", "bread baking", "trees",
    "the solar system", "electricity", "the Renaissance", "mountains", "video games", "gardening", "money",
    "the human brain", "music theory", "airplanes", "the Great Wall of China", "penguins", "batteries",
    "meditation", "the Industrial Revolution", "libraries", "DNA", "weather forecasting", "cats", "dogs",
    "soccer", "mathematics", "poetry", "the desert", "rain forests", "plastic pollution", "robots",
    "ancient Egypt", "the telephone", "volunteering", "space travel", "cheese", "bicycles", "the alphabet",
    "museums", "recycling paper", "clouds", "learning a new language", "bridges", "the periodic table",
    "elephants", "healthy eating", "computers", "the stars", "board games", "tea", "snow", "birds",
    "the Vikings", "electric guitars", "smartphones", "wind energy", "coral reefs", "traffic lights",
    "the scientific method", "chocolate", "archaeology", "origami", "trains", "vitamins", "the Moon landing",
)

HELD_OUT_TOPICS = (
    "lighthouses", "the Silk Road", "glaciers", "octopuses", "the violin", "submarines", "antibiotics",
    "the Byzantine Empire", "fungi", "hot air balloons", "tides", "quantum computing", "the camera",
    "kites", "deserts at night", "the metric system", "sharks", "windmills", "the Aztecs", "compost",
    "sign language", "fireworks", "the stethoscope", "sourdough",
)

TRAIN_STANDALONE = (
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "How do I sort a list of dictionaries by a key in Python?",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts the orders per customer.",
    "Explain what a for loop is.",
    "Write a JavaScript function that adds two numbers.",
    "What is 17 times 23?",
    "If a train travels 60 miles per hour for 3 hours, how far does it go?",
    "Solve for x: 2x + 6 = 14.",
    "What is the square root of 144?",
    "A shop sells apples at 3 for 2 dollars. How much do 12 apples cost?",
    "Write a polite email asking my manager for a day off.",
    "Write a thank-you note to a teacher.",
    "Give me a recipe for a simple vegetable soup.",
    "What should I pack for a weekend camping trip?",
    "How can I improve my sleep?",
    "Suggest five names for a pet goldfish.",
    "Translate 'good morning, how are you?' into French.",
    "What is the capital of Australia?",
    "Who wrote Romeo and Juliet?",
    "Give me tips for a job interview.",
    "How do I make a budget?",
    "Write a short bedtime story for a child.",
    "What are the primary colors?",
    "Plan a one-day trip to Paris.",
    "Write a birthday message for my best friend.",
    "What is the boiling point of water?",
    "How many continents are there? Name them.",
    "Explain the difference between weather and climate.",
    "What is a noun? Give examples.",
    "Write a to-do list for cleaning a kitchen.",
    "How do plants get their food?",
    "What are some good habits for students?",
    "Describe the taste of a lemon.",
    "Hi! How are you today?",
    "Tell me about yourself.",
    "What can you help me with?",
    "Give me a riddle and its answer.",
    "Write a short speech for a school graduation.",
)

HELD_OUT_STANDALONE = (
    "Write a Python function that returns the largest number in a list.",
    "What is 45 plus 78?",
    "Write a short email inviting colleagues to a team lunch.",
    "How do I boil an egg?",
    "What is the tallest mountain in the world?",
    "Give me three tips for staying focused while studying.",
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue.",
)


def build_prompts(num_train: int = 480, num_held_out: int = 48, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): topic x template combinations plus standalone prompts, shuffled."""
    rng = random.Random(seed)

    def mix(topics, standalone, n):
        pairs = [(t, tpl) for t in topics for tpl in TEMPLATES]
        rng.shuffle(pairs)
        out = list(standalone)
        out += [tpl.format(t=t) for t, tpl in pairs[: max(0, n - len(out))]]
        rng.shuffle(out)
        return out[:n]

    return mix(TRAIN_TOPICS, TRAIN_STANDALONE, num_train), mix(HELD_OUT_TOPICS, HELD_OUT_STANDALONE, num_held_out)
