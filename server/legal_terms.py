"""legal_terms: everyday words -> the words statutes use, for query expansion in retrieval.py.

People ask "公司拖欠工资怎么办", the statute says "用人单位……劳动报酬". Each entry maps a phrase found in a
question to statute terms that are then searched as well. Hand-written from the statutes' own wording;
extend it with your firm's vocabulary.
"""
from __future__ import annotations

TERMS: dict[str, tuple[str, ...]] = {
    # work
    "工资": ("劳动报酬", "工资"), "薪水": ("劳动报酬",), "欠薪": ("拖欠", "劳动报酬"), "拖欠": ("拖欠", "克扣"),
    "公司": ("用人单位",), "老板": ("用人单位",), "单位": ("用人单位",), "员工": ("劳动者",), "打工": ("劳动者",),
    "辞退": ("解除劳动合同",), "开除": ("解除劳动合同",), "炒鱿鱼": ("解除劳动合同",), "裁员": ("裁减人员",),
    "辞职": ("解除劳动合同", "提前三十日"), "离职": ("解除劳动合同", "终止"), "加班": ("延长工作时间", "加班费"),
    "赔偿金": ("赔偿金", "经济补偿"), "补偿": ("经济补偿",), "合同到期": ("劳动合同期满",), "不签合同": ("书面劳动合同",),
    "没签合同": ("书面劳动合同", "二倍"), "试用期": ("试用期",), "社保": ("社会保险",), "五险": ("社会保险",),
    "工伤": ("工伤",), "年假": ("年休假",), "产假": ("产假", "女职工"), "怀孕": ("孕期", "女职工"),
    "交社保": ("缴纳社会保险费",), "童工": ("未满十六周岁", "招用"), "每天": ("每日",),
    # family
    "离婚": ("离婚",), "孩子": ("子女", "未成年人"), "小孩": ("子女", "未成年人"), "抚养": ("抚养",),
    "老人": ("赡养", "老年人"), "彩礼": ("彩礼", "婚约"), "遗产": ("继承", "遗产"), "遗嘱": ("遗嘱",),
    "结婚": ("结婚", "婚姻"), "家暴": ("家庭暴力",), "婚前": ("婚前财产", "个人财产"),
    "没有遗嘱": ("法定继承", "继承顺序"), "手写": ("自书", "亲笔书写"),
    # property, contracts
    "房东": ("出租人",), "租客": ("承租人",), "租房": ("租赁", "承租人"), "房租": ("租金",), "押金": ("押金", "定金"),
    "借钱": ("借款",), "欠钱": ("借款", "债务"), "还钱": ("返还借款", "借款"), "利息": ("利息", "利率"),
    "定金": ("定金",), "违约": ("违约责任",), "物业": ("物业服务", "物业服务人"), "装修": ("装饰装修",),
    "邻居": ("相邻",), "买房": ("商品房", "买卖合同"), "卖了": ("所有权变动",), "担保人": ("保证人", "保证责任"),
    "担保": ("保证",),
    # accidents, injuries, animals
    "狗": ("饲养的动物", "动物"), "猫": ("饲养的动物", "动物"), "咬": ("动物", "损害"), "撞": ("交通事故", "损害"),
    "车祸": ("交通事故",), "受伤": ("人身损害", "侵权"), "打人": ("殴打", "伤害"), "被打": ("殴打", "伤害"),
    "医院": ("医疗机构", "诊疗活动"), "高空抛物": ("抛掷物品", "建筑物"), "扔东西": ("抛掷物品", "建筑物"),
    "楼上": ("建筑物",), "打伤": ("造成他人损害", "伤害"), "父母要赔": ("监护人", "侵权责任"),
    # traffic and crime
    "喝醉开车": ("醉酒", "驾驶"), "酒驾": ("饮酒", "驾驶"), "醉驾": ("醉酒", "驾驶"), "闯红灯": ("交通信号",),
    "驾照": ("驾驶证",), "没有驾照": ("未取得机动车驾驶证",), "被骗": ("诈骗",), "诈骗": ("诈骗公私财物",),
    "偷": ("盗窃",), "未成年": ("未成年人",), "刑事责任": ("刑事责任", "周岁"), "坐牢": ("有期徒刑",),
    "造谣": ("捏造事实", "诽谤", "名誉权"), "诽谤": ("诽谤", "名誉权"), "泄露": ("泄露", "个人信息处理者"),
    # consumers
    "网购": ("网络", "经营者"), "退货": ("退货", "七日"), "假货": ("欺诈", "三倍"), "商家": ("经营者", "销售者"),
    "买到": ("消费者", "经营者"), "快递": ("快递", "寄递"), "厂家": ("生产者",),
    "平台": ("网络交易平台", "平台经营者"),
}


# words of the question itself that match almost any article: left out of the expanded query
STOPWORDS = frozenset("我 你 他 她 我们 了 吗 的 地 得 呢 吧 啊 是 有 在 和 与 就 还 都 被 把 给 对 这 那 这个 那个 怎么 怎么办 "
                      "怎么样 怎样 什么 如何 是否 可以 能 能否 能不能 要 会 应该 需要 一个 多少 多久 谁 哪里 哪些 为什么 "
                      "请问 现在 已经 没有 不 想".split())


def replaced_words(question: str) -> set[str]:
    """Everyday phrases in `question` whose statute terms do not include the phrase itself (公司 -> 用人单位):
    searched only in the statute's wording, so 公司 stops pulling in the Company Law."""
    return {p for p, terms in TERMS.items() if p in question and p not in terms}


def expand_terms(question: str) -> list[tuple[str, float]]:
    """Statute terms for the everyday phrases in `question` (weight 1.0 each)."""
    out = []
    for phrase, terms in TERMS.items():
        if phrase in question:
            out += [(t, 1.0) for t in terms]
    return out


# Law-level prior: how often each law governs an everyday question — the governing laws of the labelled tuning set
# (trainer/data/retrieval_questions.jsonl, one count per law per question; tests/test_retrieval.py checks the two
# agree). Everyday questions are about a few laws; BM25 alone ranks an article of 户口登记条例 or 监察法 as high as
# one of 民法典 when the words match. Laws not listed get the smoothing mass only.
LAW_PRIOR = {"民法典": 42, "劳动合同法": 18, "刑法": 7, "劳动法": 5, "消费者权益保护法": 5, "道路交通安全法": 4,
             "老年人权益保障法": 3, "未成年人保护法": 2, "劳动争议调解仲裁法": 1, "妇女权益保障法": 1, "反家庭暴力法": 1,
             "电子商务法": 1, "个人信息保护法": 1, "著作权法": 1, "公司法": 1, "保险法": 1, "广告法": 1, "行政复议法": 1,
             "行政诉讼法": 1, "商标法": 1, "专利法": 1, "个人所得税法": 1, "反不正当竞争法": 1, "价格法": 1}
PRIOR_WEIGHT = 2.0      # score = BM25 + PRIOR_WEIGHT * log((count + PRIOR_SMOOTHING) / (total + PRIOR_SMOOTHING))
PRIOR_SMOOTHING = 0.5
PRIOR_POOL = 50         # BM25 candidates re-ranked with the prior
