"""Write N prompts of mixed lengths for the throughput job / pipeline benchmark (deterministic).

    python jobs/make_prompts.py N OUT.jsonl [--openai]
"""
import json
import random
import sys

TOPICS = ["the ocean", "a city at night", "how bread is made", "the history of maps", "a friendly robot",
          "photosynthesis", "the moon landing", "a mountain village", "prime numbers", "a thunderstorm",
          "the printing press", "coffee", "a lighthouse keeper", "volcanoes", "the game of chess"]
ASKS = ["Write a short poem about {t}.", "Explain {t} to a child.", "Give three facts about {t}.",
        "Write one sentence about {t}.", ("Describe {t} in detail, covering its origins, how it works today, "
                                          "and why people find it interesting. Use several paragraphs.")]


def main():
    n, out = int(sys.argv[1]), sys.argv[2]
    openai = "--openai" in sys.argv
    rng = random.Random(0)
    with open(out, "w") as f:
        for i in range(n):
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
