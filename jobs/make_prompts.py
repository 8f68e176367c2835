"""Write N prompts of mixed lengths for the throughput job / pipeline benchmark (deterministic).

    python jobs/make_prompts.py N OUT.jsonl [--openai]
"""
import argparse
import json
import random

TOPICS = ["the ocean", "a city at night", "how bread is made", "the history of maps", "a friendly robot",
          "photosynthesis", "the moon landing", "a mountain village", "prime numbers", "a thunderstorm",
          "the printing press", "coffee", "a lighthouse keeper", "volcanoes", "the game of chess"]
ASKS = ["Write a short poem about {t}.", "Explain {t} to a child.", "Give three facts about {t}.",
        "Write one sentence about {t}.", ("Describe {t} in detail, covering its origins, how it works today, "
                                          "and why people find it interesting. Use several paragraphs.")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, help="how many prompts")
    ap.add_argument("out", help="the JSONL file to write")
    ap.add_argument("--openai", action="store_true", help="OpenAI batch requests (/v1/chat/completions) instead of "
                                                          "mpiinfer's chat records")
    a = ap.parse_args()
    if a.n < 0:
        ap.error("N must be 0 or more")
    openai = a.openai
    rng = random.Random(0)
    with open(a.out, "w") as f:
        for i in range(a.n):
            q = rng.choice(ASKS).format(t=rng.choice(TOPICS))
            if rng.random() < 0.3:
                q = ("Context: " + " ".join(rng.choice(TOPICS) for _ in range(rng.randint(10, 120))) + "\n" + q)
            max_tokens = rng.choice([16, 32, 64, 128])
            if openai:
                rec = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "demo", "messages": [{"role": "user", "content": q}],
                                "max_tokens": max_tokens, "temperature": 0}}
            else:
                rec = {"id": f"req-{i}", "messages": [{"role": "user", "content": q}], "max_tokens": max_tokens}
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
