"""A synthetic lawzhidao-format CSV of any size (title, question, reply, is_best), for `lawchat prepare` at scale.

Questions get 1-4 replies (one best or none), with the mess real scrapes have: HTML tags and entities, runs of
spaces, quoted newlines, exact and near-duplicate replies (spacing/punctuation only), masked and empty replies.

    python scripts/make_lawzhidao_csv.py /tmp/lawzhidao_1m.csv --rows 1000000     # ~1.2 GB
"""
from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TOPICS = ["劳动合同", "工资", "加班费", "试用期", "工伤", "社保", "离婚", "抚养权", "房屋租赁", "押金", "借款", "交通事故",
          "消费者权益", "网购退货", "物业费", "继承", "遗嘱", "彩礼", "违约金", "经济补偿"]
FILLER = "请问这种情况怎么处理公司老板说不行我该去哪里咨询法院仲裁是否需要证据多少钱时间期限规定条款合法吗"


def sentence(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(FILLER) for _ in range(n))


def rows(n: int, seed: int):
    rng = random.Random(seed)
    made = 0
    q = 0
    while made < n:
        q += 1
        topic = rng.choice(TOPICS)
        title = f"{topic}问题{q}：{sentence(rng, rng.randint(6, 20))}？"
        question = rng.choice(["", title, sentence(rng, rng.randint(10, 80))])
        best = rng.randrange(-1, 3)           # -1: no best reply
        replies = []
        for i in range(rng.randint(1, 4)):
            body = f"根据{topic}相关规定，" + sentence(rng, rng.randint(40, 700))
            kind = rng.random()
            if kind < 0.05 and replies:
                body = replies[-1]                                        # exact duplicate
            elif kind < 0.10 and replies:
                body = replies[-1].replace("，", " , ") + "。"             # near duplicate
            elif kind < 0.15:
                body = f"<p>{body[:30]}</p><br/>{body[30:]}&nbsp;&amp;"   # HTML
            elif kind < 0.18:
                body = body[:20] + "\n\n\n" + body[20:]                   # quoted newlines
            elif kind < 0.19:
                body = "*** **** ***"                                       # masked
            elif kind < 0.20:
                body = ""
            replies.append(body)
            yield [title, question, body, "1" if i == best else "0"]
            made += 1
            if made >= n:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with a.out.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["title", "question", "reply", "is_best"])
        w.writerows(rows(a.rows, a.seed))
    print(f"{a.out}: {a.rows} rows, {a.out.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
