#!/usr/bin/env python3
"""Generate the sample data of medcare_dist (stage1.jsonl, stage2.jsonl, exam.jsonl).

Written for this project (CC0). Standard library only and deterministic: the same seed
always writes byte-identical files. Run from anywhere:

    python data/sample/make_samples.py

The content is built combinatorially from the compact tables below. It is general,
conservative health information for exercising the training pipeline, not medical advice.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240625
OUT_DIR = Path(__file__).resolve().parent.parent / "medcare_dist" / "resources" / "sample"

# ------------------------------------------------------------------------ conditions
# key, subject, confusable groups, related drug, who (self|child|other),
# English: name, symptoms (";"), first-line management, red flag,
# Chinese: name, symptoms (";"), first-line management, red flag.
_C = [
    ("htn", "internal_medicine", "cardio head metab", "amlodipine", "self",
     "high blood pressure", "morning headache;dizziness;blurred vision",
     "lifestyle change (less salt, regular exercise, weight control) plus blood-pressure medicine such as an ACE inhibitor or calcium channel blocker when needed",
     "a reading above 180/120 with chest pain, severe headache, weakness or confusion",
     "高血压", "晨起头痛;头晕;视物模糊",
     "改善生活方式（减盐、规律运动、控制体重），必要时遵医嘱使用ACE抑制剂或钙通道阻滞剂等降压药",
     "血压超过180/120并伴胸痛、剧烈头痛、肢体无力或意识混乱"),
    ("t2dm", "internal_medicine", "metab", "metformin", "self",
     "type 2 diabetes", "increased thirst;frequent urination;tiredness",
     "diet change, regular exercise and weight loss, with metformin as the usual first medicine",
     "vomiting, deep fast breathing, confusion or very high glucose readings",
     "2型糖尿病", "口渴多饮;尿频;乏力",
     "调整饮食、规律运动、减轻体重，二甲双胍通常是首选药物",
     "呕吐、呼吸深快、意识模糊或血糖极高"),
    ("asthma", "internal_medicine", "resp", "salbutamol", "self",
     "asthma", "wheezing;night-time cough;chest tightness",
     "a regular inhaled corticosteroid controller, a reliever inhaler for symptoms, and avoiding triggers",
     "being too breathless to speak in full sentences or having bluish lips",
     "哮喘", "喘息;夜间咳嗽;胸闷",
     "规律使用吸入性糖皮质激素控制，症状发作时使用缓解吸入剂，并避开诱发因素",
     "气喘到无法说完整句子或口唇发紫"),
    ("copd", "internal_medicine", "resp", "salbutamol", "self",
     "COPD", "long-standing cough with phlegm;breathlessness on exertion;frequent chest infections",
     "stopping smoking, long-acting inhaled bronchodilators, pulmonary rehabilitation and vaccination",
     "severe breathlessness at rest, drowsiness or new confusion",
     "慢性阻塞性肺疾病", "长期咳嗽咳痰;活动后气短;反复胸部感染",
     "戒烟、使用长效吸入支气管扩张剂、肺康复训练并按时接种疫苗",
     "静息时严重气促、嗜睡或新出现意识混乱"),
    ("pneu", "internal_medicine", "resp", "amoxicillin", "self",
     "community-acquired pneumonia", "fever;cough with phlegm;shortness of breath",
     "a clinical assessment, antibiotics chosen by a doctor, fluids and rest",
     "confusion, very fast breathing, low blood pressure or bluish lips",
     "社区获得性肺炎", "发热;咳嗽咳痰;气短",
     "由医生评估后使用抗生素，同时补充水分、注意休息",
     "意识混乱、呼吸非常急促、血压下降或口唇发紫"),
    ("cold", "internal_medicine", "resp head", "paracetamol", "self",
     "the common cold", "runny nose;sore throat;sneezing",
     "rest, fluids and simple pain relief such as paracetamol; antibiotics do not help",
     "difficulty breathing or a fever lasting more than three days",
     "普通感冒", "流鼻涕;咽痛;打喷嚏",
     "休息、多喝水，可用对乙酰氨基酚缓解不适；抗生素无效",
     "呼吸困难或发热超过三天"),
    ("flu", "internal_medicine", "resp", "oseltamivir", "self",
     "influenza", "sudden high fever;muscle aches;dry cough",
     "rest, fluids and fever relief; an antiviral such as oseltamivir for high-risk people, ideally within 48 hours",
     "shortness of breath, chest pain or confusion",
     "流行性感冒", "突发高热;肌肉酸痛;干咳",
     "休息、补液、退热；高危人群可在48小时内遵医嘱使用奥司他韦等抗病毒药",
     "气短、胸痛或意识混乱"),
    ("uti", "internal_medicine", "renal", None, "self",
     "urinary tract infection", "burning when urinating;needing to urinate often;lower belly pain",
     "a urine test and a short course of antibiotics prescribed by a doctor, plus plenty of fluids",
     "fever, pain in the side or back, or vomiting, which may mean a kidney infection",
     "尿路感染", "排尿灼痛;尿频;下腹痛",
     "化验尿液后遵医嘱短期使用抗生素，并多喝水",
     "发热、腰背部疼痛或呕吐，提示可能是肾脏感染"),
    ("gerd", "internal_medicine", "gi", "omeprazole", "self",
     "acid reflux (GERD)", "heartburn;sour regurgitation;chest discomfort after meals",
     "avoiding late large meals, losing excess weight, raising the head of the bed and a trial of a proton pump inhibitor",
     "difficulty swallowing, unexplained weight loss or vomiting blood",
     "胃食管反流病", "烧心;反酸;餐后胸部不适",
     "避免睡前饱餐、减轻体重、抬高床头，并可试用质子泵抑制剂",
     "吞咽困难、不明原因体重下降或呕血"),
    ("gastro", "internal_medicine", "gi", None, "self",
     "acute gastroenteritis", "diarrhoea;vomiting;stomach cramps",
     "oral rehydration solution in small frequent sips and light meals as tolerated",
     "blood in the stool, passing very little urine or being unable to keep fluids down",
     "急性胃肠炎", "腹泻;呕吐;腹部绞痛",
     "少量多次口服补液盐，能进食时吃清淡饮食",
     "便中带血、尿量明显减少或喝水也吐"),
    ("migraine", "internal_medicine", "head", "ibuprofen", "self",
     "migraine", "one-sided throbbing headache;nausea;sensitivity to light",
     "resting in a dark quiet room, taking a simple painkiller such as ibuprofen early, and keeping a trigger diary",
     "a sudden 'worst ever' headache, weakness, or fever with a stiff neck",
     "偏头痛", "单侧搏动性头痛;恶心;畏光",
     "在安静暗室休息，尽早服用布洛芬等止痛药，并记录诱发因素",
     "突发“一生中最剧烈”的头痛、肢体无力，或发热伴颈部僵硬"),
    ("anemia", "internal_medicine", "blood", None, "self",
     "iron-deficiency anaemia", "tiredness;pale skin;breathlessness on exertion",
     "finding the cause of iron loss, oral iron tablets and an iron-rich diet",
     "black stools, chest pain or fainting",
     "缺铁性贫血", "乏力;面色苍白;活动后气短",
     "查明失铁原因，口服铁剂并多吃富含铁的食物",
     "黑便、胸痛或晕厥"),
    ("hypothy", "internal_medicine", "metab", "levothyroxine", "self",
     "hypothyroidism", "tiredness;weight gain;feeling cold",
     "daily levothyroxine with regular TSH blood tests to adjust the dose",
     "extreme drowsiness, a very low body temperature or confusion",
     "甲状腺功能减退症", "乏力;体重增加;怕冷",
     "每日服用左甲状腺素，并定期复查TSH调整剂量",
     "极度嗜睡、体温过低或意识混乱"),
    ("hf", "internal_medicine", "cardio", "furosemide", "self",
     "heart failure", "breathlessness lying flat;ankle swelling;fatigue",
     "diuretics for fluid, heart medicines adjusted by a cardiologist, limiting salt and weighing yourself daily",
     "breathlessness at rest, pink frothy sputum or a weight gain of 2 kg in a few days",
     "心力衰竭", "平卧时气短;脚踝水肿;疲乏",
     "利尿剂减轻水肿，由心内科医生调整用药，限盐并每天称体重",
     "静息时气促、咳粉红色泡沫痰或几天内体重增加2公斤"),
    ("angina", "internal_medicine", "cardio", "aspirin", "self",
     "angina (coronary heart disease)", "chest pressure on exertion;pain spreading to the arm or jaw;relief with rest",
     "aspirin and a statin as prescribed, nitroglycerin for attacks, and control of blood pressure, lipids and smoking",
     "chest pain at rest or lasting more than 15 minutes",
     "冠心病心绞痛", "活动时胸部压迫感;疼痛放射至手臂或下颌;休息后缓解",
     "遵医嘱服用阿司匹林和他汀，发作时含服硝酸甘油，控制血压、血脂并戒烟",
     "静息时胸痛或持续超过15分钟"),
    ("af", "internal_medicine", "cardio", "warfarin", "self",
     "atrial fibrillation", "palpitations;an irregular pulse;breathlessness",
     "an ECG to confirm the rhythm, medicines to control the heart rate, and anticoagulation based on stroke risk",
     "fainting, chest pain or any sign of stroke",
     "心房颤动", "心悸;脉搏不齐;气短",
     "心电图确诊，用药控制心率，并根据卒中风险进行抗凝治疗",
     "晕厥、胸痛或出现任何卒中征象"),
    ("gout", "internal_medicine", "joint", "colchicine", "self",
     "gout", "sudden severe joint pain;a red swollen big toe;pain worst at night",
     "an NSAID or colchicine early in the attack, rest and ice, then long-term urate lowering and less alcohol",
     "fever with a hot swollen joint, which may be a joint infection",
     "痛风", "突发剧烈关节痛;大脚趾红肿;夜间疼痛加重",
     "发作早期使用非甾体抗炎药或秋水仙碱，休息冰敷，长期降尿酸并限酒",
     "发热伴关节红肿热痛，可能是关节感染"),
    ("bronchiolitis", "pediatrics", "resp", None, "child",
     "bronchiolitis", "runny nose;cough;fast or noisy breathing",
     "supportive care: small frequent feeds, saline nose drops and gentle suction",
     "pauses in breathing, poor feeding or the skin pulling in between the ribs",
     "毛细支气管炎", "流鼻涕;咳嗽;呼吸急促或有喘鸣",
     "以支持治疗为主：少量多次喂养、生理盐水滴鼻并轻柔吸鼻",
     "呼吸暂停、吃奶明显减少或出现肋间凹陷"),
    ("febsz", "pediatrics", "neuro", "paracetamol", "child",
     "a febrile seizure", "fever;brief whole-body jerking;a short sleepy spell afterwards",
     "laying the child on their side, timing the seizure, putting nothing in the mouth and treating the fever for comfort",
     "a seizure lasting more than 5 minutes or a child who does not wake normally",
     "热性惊厥", "发热;短暂全身抽动;抽搐后嗜睡",
     "让孩子侧卧、记录抽搐时间、不要往嘴里塞东西，并退热让孩子舒服些",
     "抽搐超过5分钟或孩子不能正常清醒"),
    ("otitis", "pediatrics", "ent resp", "amoxicillin", "child",
     "acute otitis media", "ear pain;fever;irritability",
     "pain relief first; many cases settle, and a doctor may prescribe amoxicillin for young or severe cases",
     "swelling behind the ear, a stiff neck or unusual drowsiness",
     "急性中耳炎", "耳痛;发热;烦躁哭闹",
     "先止痛，许多病例可自愈；低龄或病情较重时医生可能开阿莫西林",
     "耳后肿胀、颈部僵硬或异常嗜睡"),
    ("hfmd", "pediatrics", "skin gi", "paracetamol", "child",
     "hand, foot and mouth disease", "fever;mouth ulcers;spots on the hands and feet",
     "fluids, pain relief, soft cool foods and careful hand washing",
     "drowsiness, limb jerking, repeated vomiting or fast breathing",
     "手足口病", "发热;口腔溃疡;手足皮疹",
     "多喝水、止痛、吃温凉软食，并勤洗手",
     "嗜睡、肢体抖动、反复呕吐或呼吸急促"),
    ("anaph", "emergency", "allergy", "epinephrine", "other",
     "anaphylaxis", "hives;swelling of the lips or throat;difficulty breathing",
     "an adrenaline (epinephrine) injection into the outer thigh at once, calling emergency services and lying flat",
     "any breathing difficulty, wheeze or collapse",
     "严重过敏反应", "荨麻疹;口唇或喉咙肿胀;呼吸困难",
     "立即在大腿外侧注射肾上腺素，拨打急救电话并让患者平躺",
     "任何呼吸困难、喘鸣或虚脱"),
    ("heat", "emergency", "neuro", None, "other",
     "heat stroke", "very high body temperature;confusion;hot flushed skin",
     "calling emergency services, moving the person somewhere cool and cooling them rapidly with water and fanning",
     "confusion, a seizure or loss of consciousness",
     "热射病", "体温极高;意识混乱;皮肤发烫潮红",
     "拨打急救电话，转移到阴凉处，用水和扇风迅速降温",
     "意识混乱、抽搐或昏迷"),
    ("burn", "emergency", "skin", None, "self",
     "a minor burn", "pain;redness;blisters",
     "cooling under running water for 20 minutes and covering loosely with cling film; no ice or butter",
     "a burn larger than the palm, on the face, hands or genitals, or one that looks white or charred",
     "轻度烧烫伤", "疼痛;发红;水疱",
     "流动冷水冲洗20分钟，再用保鲜膜松松覆盖；不要用冰块或涂抹黄油",
     "烧伤面积超过手掌、位于面部手部或会阴，或创面发白焦黑"),
    ("hypogly", "emergency", "metab neuro", None, "other",
     "low blood sugar (hypoglycaemia)", "shaking;sweating;sudden confusion",
     "15 grams of fast sugar such as juice or glucose tablets, rechecking after 15 minutes",
     "unconsciousness or a seizure (give nothing by mouth)",
     "低血糖", "手抖;出汗;突然意识混乱",
     "立即摄入15克快速糖（如果汁或葡萄糖片），15分钟后复测血糖",
     "昏迷或抽搐（此时不要经口喂食）"),
    ("stroke", "emergency", "neuro head", None, "other",
     "stroke", "sudden face drooping;weakness of one arm;slurred speech",
     "calling emergency services immediately and noting the time symptoms started, since treatment is time-critical",
     "any sudden one-sided weakness, even if it seems to improve",
     "脑卒中", "突发口角歪斜;单侧手臂无力;言语含糊",
     "立即拨打急救电话并记下发病时间，治疗越早越好",
     "任何突发的单侧无力，即使症状似乎好转"),
]

_CF = ("key subject groups drug who en_name en_sym en_mgmt en_red "
       "zh_name zh_sym zh_mgmt zh_red").split()
CONDITIONS = [dict(zip(_CF, row)) for row in _C]
for _c in CONDITIONS:
    _c["groups"] = set(_c["groups"].split())
    _c["en_sym"] = _c["en_sym"].split(";")
    _c["zh_sym"] = _c["zh_sym"].split(";")

# ----------------------------------------------------------------------------- drugs
# key, English: name, class, main use, key adverse effect or caution;
# Chinese: name, class, main use, caution.
_D = [
    ("metformin", "metformin", "a biguanide", "type 2 diabetes",
     "stomach upset and diarrhoea; avoid in severe kidney impairment",
     "二甲双胍", "双胍类降糖药", "2型糖尿病", "胃肠不适、腹泻；严重肾功能不全者禁用"),
    ("amlodipine", "amlodipine", "a calcium channel blocker", "high blood pressure and angina",
     "ankle swelling and flushing",
     "氨氯地平", "钙通道阻滞剂", "高血压和心绞痛", "脚踝水肿、面部潮红"),
    ("enalapril", "enalapril", "an ACE inhibitor", "high blood pressure and heart failure",
     "dry cough, rarely face swelling; not for use in pregnancy",
     "依那普利", "血管紧张素转换酶（ACE）抑制剂", "高血压和心力衰竭", "干咳，少见面部肿胀；孕妇禁用"),
    ("atorvastatin", "atorvastatin", "a statin", "lowering LDL cholesterol",
     "muscle aches; report unexplained muscle pain",
     "阿托伐他汀", "他汀类降脂药", "降低低密度脂蛋白胆固醇", "肌肉酸痛；出现不明原因肌痛应就医"),
    ("aspirin", "low-dose aspirin", "an antiplatelet agent", "preventing heart attack and stroke in people at high risk",
     "stomach irritation and bleeding",
     "小剂量阿司匹林", "抗血小板药", "高危人群预防心梗和卒中", "胃部刺激和出血风险"),
    ("amoxicillin", "amoxicillin", "a penicillin antibiotic", "bacterial infections such as ear infections and pneumonia",
     "allergic reactions; do not use with a penicillin allergy",
     "阿莫西林", "青霉素类抗生素", "中耳炎、肺炎等细菌感染", "过敏反应；青霉素过敏者禁用"),
    ("ibuprofen", "ibuprofen", "a non-steroidal anti-inflammatory drug (NSAID)", "pain, fever and inflammation",
     "stomach irritation and kidney strain; take with food",
     "布洛芬", "非甾体抗炎药", "止痛、退热、抗炎", "刺激胃部、加重肾脏负担；宜餐后服用"),
    ("paracetamol", "paracetamol (acetaminophen)", "a simple analgesic and antipyretic", "pain and fever",
     "liver damage in overdose; respect the daily maximum",
     "对乙酰氨基酚", "解热镇痛药", "止痛和退热", "过量可致肝损伤；不可超过每日最大剂量"),
    ("omeprazole", "omeprazole", "a proton pump inhibitor", "acid reflux and stomach ulcers",
     "headache; long-term use may lower magnesium and vitamin B12",
     "奥美拉唑", "质子泵抑制剂", "胃食管反流和胃溃疡", "头痛；长期使用可能降低镁和维生素B12水平"),
    ("salbutamol", "salbutamol (albuterol)", "a short-acting beta-2 agonist", "quick relief of asthma and COPD symptoms",
     "tremor and a fast heartbeat",
     "沙丁胺醇", "短效β2受体激动剂", "快速缓解哮喘和慢阻肺症状", "手抖、心跳加快"),
    ("levothyroxine", "levothyroxine", "a thyroid hormone replacement", "hypothyroidism",
     "palpitations if the dose is too high; take on an empty stomach",
     "左甲状腺素", "甲状腺激素替代药", "甲状腺功能减退症", "剂量过大可致心悸；需空腹服用"),
    ("warfarin", "warfarin", "a vitamin K antagonist anticoagulant", "preventing clots in atrial fibrillation and venous thrombosis",
     "bleeding; needs regular INR checks and has many interactions",
     "华法林", "维生素K拮抗剂类抗凝药", "房颤和静脉血栓的抗凝治疗", "出血风险；需定期监测INR，药物相互作用多"),
    ("furosemide", "furosemide", "a loop diuretic", "fluid overload in heart failure",
     "low potassium and dehydration",
     "呋塞米", "袢利尿剂", "心力衰竭的液体潴留", "低钾和脱水"),
    ("epinephrine", "adrenaline (epinephrine)", "an adrenergic agonist", "first-line treatment of anaphylaxis",
     "a racing heart and shakiness; still give it without delay in anaphylaxis",
     "肾上腺素", "肾上腺素能受体激动剂", "严重过敏反应的一线治疗", "心跳加快、手抖；严重过敏时仍应立即使用"),
    ("oseltamivir", "oseltamivir", "a neuraminidase inhibitor antiviral", "treating influenza",
     "nausea; works best started within 48 hours",
     "奥司他韦", "神经氨酸酶抑制剂类抗病毒药", "治疗流感", "恶心；发病48小时内开始效果最好"),
    ("colchicine", "colchicine", "a microtubule inhibitor", "gout flares",
     "diarrhoea; toxic in overdose and with some interacting drugs",
     "秋水仙碱", "微管抑制剂", "痛风急性发作", "腹泻；过量或与部分药物合用时有毒性"),
    ("loratadine", "loratadine", "a non-sedating antihistamine", "hay fever and hives",
     "usually well tolerated; occasional headache or drowsiness",
     "氯雷他定", "非镇静类抗组胺药", "过敏性鼻炎和荨麻疹", "一般耐受良好，偶有头痛或嗜睡"),
]
_DF = "key en_name en_class en_use en_caution zh_name zh_class zh_use zh_caution".split()
DRUGS = [dict(zip(_DF, row)) for row in _D]
DRUG = {d["key"]: d for d in DRUGS}
COND = {c["key"]: c for c in CONDITIONS}
assert all(c["drug"] in DRUG for c in CONDITIONS if c["drug"])


# ------------------------------------------------------------------------- helpers
def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def en_list(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def zh_list(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else "、".join(items[:-1]) + "和" + items[-1]


def fill(template: str, lang: str, cond=None, drug=None) -> str:
    """Format a template with the fields of a condition and/or drug in one language."""
    f = {}
    if cond is not None:
        f.update(name=cond[lang + "_name"], Name=cap(cond[lang + "_name"]),
                 mgmt=cond[lang + "_mgmt"], red=cond[lang + "_red"],
                 syms=(en_list if lang == "en" else zh_list)(cond[lang + "_sym"]))
    if drug is not None:
        f.update(drug=drug[lang + "_name"], Drug=cap(drug[lang + "_name"]),
                 cls=drug[lang + "_class"], use=drug[lang + "_use"],
                 caution=drug[lang + "_caution"])
    return template.format(**f)


# ---------------------------------------------------------------- stage-1 phrasings
# Per language and aspect: question phrasings, answer bodies, follow-up question.
Q1 = {
    "en": {
        "sym": ["What symptoms are typical of {name}?", "Which symptoms point to {name}?"],
        "mgmt": ["How is {name} usually treated?", "What is the first-line management of {name}?"],
        "red": ["When should someone with {name} seek urgent care?",
                "What warning signs of {name} need emergency attention?"],
        "ovr": ["Can you give me a short overview of {name}?", "My doctor mentioned {name}. What should I know?"],
        "use": ["What is {drug} used for?", "Why would a doctor prescribe {drug}?"],
        "caution": ["What side effects should I watch for with {drug}?",
                    "Is there anything to be careful about when taking {drug}?"],
        "dovr": ["What kind of medicine is {drug}?", "Can you tell me briefly about {drug}?"],
    },
    "zh": {
        "sym": ["{name}有哪些典型症状？", "{name}一般会有什么表现？"],
        "mgmt": ["{name}一般怎么治疗？", "{name}的一线处理方法是什么？"],
        "red": ["{name}出现哪些情况需要立即就医？", "{name}有哪些危险信号？"],
        "ovr": ["请简单介绍一下{name}。", "医生提到了{name}，我需要了解些什么？"],
        "use": ["{drug}是治什么的？", "医生为什么会开{drug}？"],
        "caution": ["使用{drug}要注意哪些副作用？", "服用{drug}有什么需要小心的？"],
        "dovr": ["{drug}是什么类型的药？", "能简单介绍一下{drug}吗？"],
    },
}
A1 = {
    "en": {
        "sym": ["{Name} typically causes {syms}.", "Common features of {name} are {syms}."],
        "mgmt": ["The usual first-line approach to {name} is {mgmt}.", "For {name}, first-line care is {mgmt}."],
        "red": ["Red-flag signs for {name}: {red}. These need urgent medical care.",
                "Seek urgent care straight away with any of these: {red}."],
        "ovr": ["{Name} typically causes {syms}. First-line care is {mgmt}. Seek urgent care for: {red}.",
                "Key symptoms of {name} are {syms}. It is usually managed by {mgmt}. Red flags: {red}."],
        "use": ["{Drug} is {cls} used mainly for {use}.", "Doctors prescribe {drug}, {cls}, mainly for {use}."],
        "caution": ["The main caution with {drug} is {caution}.", "A key adverse effect or caution with {drug}: {caution}."],
        "dovr": ["{Drug} is {cls}, used mainly for {use}. Key caution: {caution}.",
                 "{Drug} is {cls}. Main use: {use}. Watch for: {caution}."],
    },
    "zh": {
        "sym": ["{name}的典型表现有{syms}。", "{name}常见症状包括{syms}。"],
        "mgmt": ["{name}的一线处理是：{mgmt}。", "{name}通常这样处理：{mgmt}。"],
        "red": ["出现以下情况应立即就医：{red}。", "{name}的危险信号：{red}，一旦出现要尽快就诊。"],
        "ovr": ["{name}常见症状有{syms}。一线处理：{mgmt}。需警惕：{red}。",
                "{name}的主要表现是{syms}；通常{mgmt}。危险信号：{red}。"],
        "use": ["{drug}属于{cls}，主要用于{use}。", "医生开{drug}（{cls}）主要是用于{use}。"],
        "caution": ["{drug}的主要注意事项：{caution}。", "使用{drug}需要留意：{caution}。"],
        "dovr": ["{drug}属于{cls}，主要用于{use}。注意：{caution}。",
                 "{drug}是一种{cls}，用于{use}。需留意：{caution}。"],
    },
}
FOLLOW1 = {
    "en": {"sym": "What symptoms does it usually cause?", "mgmt": "And what is the usual treatment?",
           "red": "What warning signs should make me go to hospital?",
           "use": "What is it mainly used for?", "caution": "Are there side effects I should know about?"},
    "zh": {"sym": "它通常有哪些症状？", "mgmt": "那一般怎么治疗呢？", "red": "出现什么情况必须去医院？",
           "use": "它主要用来治什么？", "caution": "有什么副作用需要注意吗？"},
}
OPEN1 = {"en": ["", "Good question. ", "In brief: ", "Here is a short answer. "],
         "zh": ["", "好的。", "简单来说，", "这是个好问题。"]}
CLOSE1 = {"en": ["", " This is general information; a doctor can advise on your own situation.",
                 " If you are unsure, please check with a doctor or pharmacist.",
                 " Follow your own clinician's advice, as everyone is different."],
          "zh": ["", "以上为一般性信息，具体请咨询医生。", "如有疑问，请及时咨询医生或药师。",
                 "每个人情况不同，请遵从主治医生的建议。"]}
SYSTEM1 = {"en": ["You are a careful medical assistant. Give accurate, conservative health information "
                  "and advise seeing a doctor when appropriate.",
                  "You are a knowledgeable medical assistant. Answer briefly and clearly."],
           "zh": ["你是一名严谨的医学助手，请提供准确、稳妥的健康信息，必要时建议就医。",
                  "你是一名专业的医疗助手，请简洁清晰地回答。"]}


# --------------------------------------------------------------------- stage 1
S1_COUNTS = {"en": 192, "zh": 128}  # 320 records, 60% English
S1_SYSTEM, S1_FOLLOW = 32, 48  # ~10% with a system turn, ~15% with a follow-up exchange


def turn1(who: str, text: str) -> dict:
    return {"from": who, "value": text}


def make_stage1(rng: random.Random) -> list[dict]:
    topics = [("cond", c, a) for c in CONDITIONS for a in ("sym", "mgmt", "red", "ovr")]
    topics += [("drug", d, a) for d in DRUGS for a in ("use", "caution", "dovr")]
    plan = []
    for lang, n in S1_COUNTS.items():
        order = topics[:]
        rng.shuffle(order)
        base = [rng.randrange(2) for _ in order]
        for i in range(n):  # a second pass over a topic uses the other question phrasing
            kind, item, aspect = order[i % len(order)]
            plan.append((lang, kind, item, aspect, (base[i % len(order)] + i // len(order)) % 2))
    rng.shuffle(plan)
    eligible = [i for i, p in enumerate(plan) if p[3] not in ("ovr", "dovr")]
    follow = set(rng.sample(eligible, S1_FOLLOW))
    system = set(rng.sample(range(len(plan)), S1_SYSTEM))
    records = []
    for i, (lang, kind, item, aspect, qi) in enumerate(plan):
        cond, drug = (item, None) if kind == "cond" else (None, item)
        turns = [turn1("system", rng.choice(SYSTEM1[lang]))] if i in system else []
        question = fill(Q1[lang][aspect][qi], lang, cond, drug)
        answer = rng.choice(OPEN1[lang]) + fill(rng.choice(A1[lang][aspect]), lang, cond, drug)
        if i not in follow:
            answer += rng.choice(CLOSE1[lang])
        turns += [turn1("human", question), turn1("gpt", answer)]
        if i in follow:
            others = [a for a in (("sym", "mgmt", "red") if cond else ("use", "caution")) if a != aspect]
            fa = rng.choice(others)
            reply = fill(rng.choice(A1[lang][fa]), lang, cond, drug) + rng.choice(CLOSE1[lang])
            turns += [turn1("human", FOLLOW1[lang][fa]), turn1("gpt", reply)]
        records.append({"conversations": turns})
    return records



# ---------------------------------------------------------------- stage-2 phrasings
CHRONIC = {"htn", "t2dm", "asthma", "copd", "gerd", "anemia", "hypothy", "hf", "angina", "af"}
SOON = {"pneu", "uti", "hf", "angina", "af"}  # new symptoms worth seeing a doctor promptly
OLDER = {"htn", "copd", "hf", "angina", "af", "gout"}  # patients aged 45-75 rather than 22-70
ACUTE = {"febsz", "anaph", "heat", "burn", "hypogly", "stroke"}
DUR = {"en": {"chronic": ["for a few weeks", "for about two months", "on and off for months"],
              "sub": ["since yesterday", "for two days", "for three days"]},
       "zh": {"chronic": ["最近几周", "这两个月", "近几个月"], "sub": ["从昨天开始", "这两天", "这三天"]}}
KID = {"en": ["son", "daughter"], "zh": ["儿子", "女儿"]}
KID_AGE = {"baby": [("6-month-old", "6个月大"), ("9-month-old", "9个月大"), ("11-month-old", "11个月大")],
           "child": [("2-year-old", "2岁"), ("3-year-old", "3岁"), ("4-year-old", "4岁")]}
REL = [("my father", "我父亲", "he", "他"), ("my mother", "我母亲", "she", "她"), ("my husband", "我丈夫", "he", "他"),
       ("my wife", "我妻子", "she", "她"), ("my brother", "我哥哥", "he", "他"), ("my sister", "我姐姐", "she", "她")]
SEX = [("man", "男"), ("woman", "女")]
CTX = {  # optional scene-setting sentence before the symptoms
    "burn": ("I spilled hot water on my forearm a few minutes ago. ", "我刚才被开水烫到了前臂。"),
    "hypogly": ("{csubj} has diabetes and takes insulin. ", "{csubj}有糖尿病，一直在打胰岛素。"),
    "heat": ("{csubj} has been working outside all afternoon in the heat. ", "{csubj}下午一直在高温下户外干活。"),
    "anaph": ("{csubj} just ate a dish with peanuts. ", "{csubj}刚吃了一道含花生的菜。"),
    "febsz": ("It started with a cold yesterday. ", "孩子昨天开始感冒。"),
}
U2 = {
    "en": {
        "self": ["Hi, I'm a {age}-year-old {sex}. {ctx}I've had {syms} {dur}. What could this be?",
                 "{ctx}I've been dealing with {syms} {dur}. I'm {age}. Should I be worried?",
                 "Can you help? {ctx}I'm {age} and have had {syms} {dur}. What should I do?"],
        "child": ["My {age} {kid} has had {syms} {dur}. {ctx}What should I do?",
                  "I'm worried about my {age} {kid}: {syms} {dur}. Is this serious?",
                  "Our {age} {kid} has had {syms} {dur}. How can we help at home?"],
        "acute": ["{ctx}{now} {syms}. What should I do?",
                  "Please help! {now} {syms}. {ctx}Is this an emergency?"],
    },
    "zh": {
        "self": ["你好，我今年{age}岁，{sex}。{ctx}{dur}出现了{syms}，这可能是什么问题？",
                 "{ctx}我{age}岁，{dur}一直有{syms}，需要担心吗？",
                 "想咨询一下：我{age}岁，{dur}有{syms}，该怎么办？"],
        "child": ["我家{age}的{kid}{dur}出现了{syms}。{ctx}该怎么办？",
                  "孩子{age}，{dur}有{syms}，严不严重？",
                  "我家{kid}{age}，{dur}出现{syms}，在家能做些什么？"],
        "acute": ["{ctx}{now}{syms}，该怎么办？", "急！{now}{syms}。{ctx}这是急症吗？"],
    },
}
NOW = {"en": {"self": "Now the area has", "child": "Just now my {age} {kid} had", "other": "Right now {nsubj} has"},
       "zh": {"self": "现在局部出现", "child": "刚才我家{age}的{kid}出现了", "other": "{nsubj}现在出现"}}
EMPATHY = {
    "en": {"adult": ["I'm sorry you're dealing with this; it sounds uncomfortable.",
                     "That sounds worrying, and it's good that you're asking about it.",
                     "Thank you for explaining so clearly. Let's go through it together."],
           "child": ["It's completely understandable to be worried when your child is unwell.",
                     "I'm sorry your little one is poorly; let's go through this calmly."],
           "acute": ["This could be serious, so let's act quickly.",
                     "I understand this is frightening. Here is what to do now."]},
    "zh": {"adult": ["听起来你这段时间不太舒服，辛苦了。", "理解你的担心，我们一起来梳理一下。", "谢谢你描述得这么清楚。"],
           "child": ["孩子不舒服，家长着急是很正常的。", "理解你的担心，我们一步一步来看。"],
           "acute": ["这种情况可能比较危急，请先按下面做。", "我理解你现在很紧张，先别慌。"]},
}
TIMING = {"en": {"chronic": "book a GP appointment within the next week or two",
                 "sub": "see a doctor if it is not improving within a day or two",
                 "soon": "see a doctor today or tomorrow",
                 "child": "have your child seen by a doctor within 24 hours, sooner if they seem worse"},
          "zh": {"chronic": "建议一两周内到门诊就诊", "sub": "如果一两天内没有好转，请去门诊看看",
                 "soon": "建议今明两天内就诊",
                 "child": "建议24小时内带孩子就诊，如精神变差请更早"}}
SYSTEM2 = {"en": ["You are a compassionate clinical assistant. Structure answers as assessment, advice and "
                  "when to see a doctor. Never replace an in-person examination.",
                  "You are a medical assistant for patients. Be warm, clear and cautious."],
           "zh": ["你是一名富有同理心的临床助手，请按“初步判断、建议、何时就医”组织回答，不能替代面诊。",
                  "你是一名面向患者的医疗助手，请温和、清晰、稳妥地回答。"]}
ANSWER2 = {
    "en": {"plain": "{emp}\n\n**Assessment:** {Syms} can fit {name}, though other causes are possible and only an "
                    "examination can confirm it.\n\n**Advice:** The usual first-line approach is {mgmt}. Keep a note "
                    "of your symptoms and don't start prescription medicines on your own.\n\n**When to see a "
                    "doctor:** {timing}. Seek emergency care at once for any of these: {red}.",
           "acute": "{emp}\n\n**Assessment:** {Syms} suggest {name}, which needs urgent attention.\n\n**What to do "
                    "now:** The first step is {mgmt}.\n\n**When to get help:** even if things settle, a doctor "
                    "should assess this today. Call emergency "
                    "services immediately for any of these: {red}."},
    "zh": {"plain": "{emp}\n\n**初步判断：**{syms}可能与{name}有关，但也可能是其他原因，需要医生检查才能确定。\n\n"
                    "**建议：**一线处理通常是{mgmt}。请记录症状变化，不要自行使用处方药。\n\n"
                    "**何时就医：**{timing}；出现以下情况请立即就医：{red}。",
           "acute": "{emp}\n\n**初步判断：**{syms}提示可能是{name}，需要紧急处理。\n\n**现在该做：**{mgmt}。\n\n"
                    "**何时求助：**即使症状缓解，今天也应由医生评估；出现以下情况立即拨打急救电话：{red}。"},
}
FOLLOW2 = {
    "en": {"drug": ("The doctor prescribed {drug}{for_kid}. Is there anything I should watch out for?",
                    "{Drug} is {cls} used for {use}. The main caution is {caution}. Take it exactly as prescribed "
                    "and tell your doctor if anything worries you."),
           "wait": ("Is this serious? Can I just wait and see?",
                    "It is often manageable, but please don't ignore it: {timing}. Don't wait if you notice any "
                    "of these: {red}."),
           "acute": ("What should I tell the paramedics or doctors?",
                     "Tell them when the symptoms started, what happened just before, any medicines and allergies, "
                     "and what you have already done. While you wait, keep watching for: {red}.")},
    "zh": {"drug": ("医生{for_kid}开了{drug}，需要注意什么？",
                    "{drug}属于{cls}，用于{use}。主要注意：{caution}。请严格按医嘱服用，有不适及时告诉医生。"),
           "wait": ("严重吗？可以先观察看看吗？",
                    "多数情况可以处理，但不要忽视：{timing}。如出现以下情况不要等待：{red}。"),
           "acute": ("到了医院我应该告诉医生什么？",
                     "说明症状开始的时间、发病前发生了什么、正在用的药物和过敏史，以及已经做过的处理。"
                     "等待时继续留意：{red}。")},
}


# --------------------------------------------------------------------- stage 2
S2_COUNTS = {"en": 72, "zh": 48}  # 120 records
S2_SYSTEM, S2_FOLLOW = 24, 24  # ~20% each


def msg(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def stage2_turns(rng: random.Random, lang: str, c: dict, follow: bool) -> list[dict]:
    en = lang == "en"
    acute, who = c["key"] in ACUTE, c["who"]
    kid = rng.choice(KID[lang])
    age = rng.choice(KID_AGE["baby" if c["key"] == "bronchiolitis" else "child"])[0 if en else 1] \
        if who == "child" else str(rng.randint(*((45, 75) if c["key"] in OLDER else (22, 70))))
    rel = rng.choice(REL)
    ti = rng.randrange(len(U2[lang]["acute"]))  # acute template 0 puts the scene first, 1 after the symptoms
    first, pron = (rel[0], rel[2]) if en else (rel[1], rel[3])
    f = {"kid": kid, "age": age, "sex": rng.choice(SEX)[0 if en else 1],
         "csubj": cap(first) if ti == 0 else cap(pron),
         "nsubj": pron if ti == 0 and c["key"] in CTX else first,
         "syms": (en_list if en else zh_list)(c[lang + "_sym"])}
    f["ctx"] = CTX[c["key"]][0 if en else 1].format(**f) if c["key"] in CTX else ""
    tempo = "chronic" if c["key"] in CHRONIC else "sub"
    f["dur"] = rng.choice(DUR[lang][tempo])
    if acute:
        f["now"] = NOW[lang][who].format(**f)
        user = U2[lang]["acute"][ti].format(**f)
    else:
        user = rng.choice(U2[lang][who]).format(**f)
    user = cap(user.replace("  ", " ").strip())
    emp = rng.choice(EMPATHY[lang]["acute" if acute else ("child" if who == "child" else "adult")])
    timing = TIMING[lang]["child" if who == "child" else "soon" if c["key"] in SOON else tempo]
    g = {"emp": emp, "timing": timing if not en else cap(timing), "Syms": cap(f["syms"]), "syms": f["syms"],
         "name": c[lang + "_name"], "mgmt": c[lang + "_mgmt"], "red": c[lang + "_red"]}
    turns = [msg("user", user), msg("assistant", ANSWER2[lang]["acute" if acute else "plain"].format(**g))]
    if follow:
        kind = "acute" if acute else rng.choice(["drug", "wait"] if c["drug"] else ["wait"])
        q, a = FOLLOW2[lang][kind]
        d = DRUG.get(c["drug"]) if kind == "drug" else None
        h = dict(g, timing=timing, for_kid=(" for my child" if en else "给孩子") if who == "child" else
                 ("" if en else "给我"))
        if d:
            h.update(drug=d[lang + "_name"], Drug=cap(d[lang + "_name"]), cls=d[lang + "_class"],
                     use=d[lang + "_use"], caution=d[lang + "_caution"])
        turns += [msg("user", q.format(**h)), msg("assistant", a.format(**h))]
    return turns


def make_stage2(rng: random.Random, counts: dict = S2_COUNTS, n_follow: int = S2_FOLLOW,
                n_system: int = S2_SYSTEM) -> list[dict]:
    plan = []
    for lang, n in counts.items():
        order = CONDITIONS[:]
        rng.shuffle(order)
        plan += [(lang, order[i % len(order)]) for i in range(n)]
    rng.shuffle(plan)
    follow = set(rng.sample(range(len(plan)), n_follow))
    system = set(rng.sample(range(len(plan)), n_system))
    records = []
    for i, (lang, c) in enumerate(plan):
        head = [msg("system", rng.choice(SYSTEM2[lang]))] if i in system else []
        records.append({"messages": head + stage2_turns(rng, lang, c, i in follow)})
    return records



# -------------------------------------------------------------------------- exam
# Drugs whose tags intersect are never distractors for each other: "caution tags|use tags".
TAGS = {
    "metformin": "gi kidney|diab", "amlodipine": "swell|bp", "enalapril": "swell cough|bp hf",
    "atorvastatin": "muscle|cv", "aspirin": "gi bleed|cv pain", "amoxicillin": "allergy|infect",
    "ibuprofen": "gi bleed kidney|pain", "paracetamol": "liver|pain", "omeprazole": "head|gi",
    "salbutamol": "heart|resp adren", "levothyroxine": "heart|thyroid", "warfarin": "bleed|cv",
    "furosemide": "fluid|hf", "epinephrine": "heart|allergy adren", "oseltamivir": "gi|infect",
    "colchicine": "gi|pain", "loratadine": "head|allergy",
}
for _d in DRUGS:
    _caut, _use = TAGS[_d["key"]].split("|")
    _d["ctags"], _d["utags"] = set(_caut.split()), set(_use.split())
EXAM_QUOTA = {"pharmacology": 18, "internal_medicine": 18, "pediatrics": 12, "emergency": 12}
EXAM_Q = {  # question kind -> (English stem, Chinese stem)
    "dx": ("{who_en} presents with {syms}. What is the most likely diagnosis?", "{who_zh}出现{syms}，最可能的诊断是？"),
    "mgmt": ("What is the first-line management of {name}?", "{name}的一线处理是？"),
    "sym": ("Which set of symptoms is most typical of {name}?", "下列哪组症状最符合{name}？"),
    "class": ("Which drug class does {drug} belong to?", "{drug}属于哪一类药物？"),
    "which": ("Which of these drugs is {cls}?", "下列哪种药物属于{cls}？"),
    "use": ("What is {drug} mainly used for?", "{drug}主要用于？"),
    "caution": ("Which adverse effect or caution is most associated with {drug}?", "与{drug}关系最密切的不良反应或注意事项是？"),
}


def bare(text: str) -> str:
    """Drop a leading English article: 'a statin' -> 'statin'."""
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):]
    return text


def exam_option(kind: str, lang: str, item: dict) -> str:
    en = lang == "en"
    if kind == "dx":
        return cap(item[lang + "_name"]) if en else item["zh_name"]
    if kind == "sym":
        return cap(en_list(item["en_sym"])) if en else zh_list(item["zh_sym"])
    if kind == "class":
        return cap(bare(item["en_class"])) if en else item["zh_class"]
    if kind == "which":
        return cap(item[lang + "_name"])
    field = {"mgmt": "mgmt", "use": "use", "caution": "caution"}[kind]
    return cap(item[lang + "_" + field]) if en else item[lang + "_" + field]


def exam_record(rng: random.Random, kind: str, item: dict, lang: str, subject: str, pos: int) -> dict:
    en = lang == "en"
    if kind in ("dx", "mgmt", "sym"):
        infant, child = item["key"] == "bronchiolitis", item["subject"] == "pediatrics"
        pool = [c for c in CONDITIONS if not c["groups"] & item["groups"] and not (child and c["key"] in OLDER)]
        stem = EXAM_Q[kind][0 if en else 1].format(
            name=item[lang + "_name"], syms=(en_list if en else zh_list)(item[lang + "_sym"]),
            who_en="An infant" if infant else "A young child" if child else "A patient",
            who_zh="婴儿" if infant else "幼儿" if child else "患者")
    else:
        tags = "ctags" if kind == "caution" else "utags"
        pool = [d for d in DRUGS if not d[tags] & item[tags]]
        stem = EXAM_Q[kind][0 if en else 1].format(drug=item[lang + "_name"], cls=item[lang + "_class"])
    wrong = [exam_option(kind, lang, x) for x in rng.sample(pool, 3)]
    right = exam_option(kind, lang, item)
    assert right not in wrong and len(set(wrong)) == 3
    texts = wrong[:pos] + [right] + wrong[pos:]
    letters = "ABCD"
    return {"question": stem, "options": dict(zip(letters, texts)), "answer": letters[pos], "subject": subject}


def make_exam(rng: random.Random) -> list[dict]:
    plan = []
    for subject, quota in EXAM_QUOTA.items():
        if subject == "pharmacology":
            pool = [(k, d) for d in DRUGS for k in ("class", "which", "use", "caution")]
        else:
            pool = [(k, c) for c in CONDITIONS if c["subject"] == subject for k in ("dx", "mgmt", "sym")]
        rng.shuffle(pool)
        n_en = round(quota * 0.6)
        langs = ["en"] * n_en + ["zh"] * (quota - n_en)
        rng.shuffle(langs)
        plan += [(kind, item, lang, subject) for (kind, item), lang in zip((pool * 2)[:quota], langs)]
    rng.shuffle(plan)
    return [exam_record(rng, kind, item, lang, subject, i % 4) for i, (kind, item, lang, subject) in enumerate(plan)]



# ------------------------------------------------------------------- write + check
def validate_turns(turns: list, role_key: str, text_key: str, names: dict) -> None:
    roles = [names[t[role_key]] for t in turns]  # KeyError on an unknown role
    assert all(isinstance(t[text_key], str) and t[text_key].strip() for t in turns), "empty text"
    body = roles[1:] if roles[0] == "system" else roles
    assert body and len(body) % 2 == 0, roles
    assert body == ["user", "assistant"] * (len(body) // 2), roles


HELDOUT_COUNTS = {"en": 12, "zh": 8}  # held-out patient conversations, none identical to a stage-2 record


def make_heldout(rng: random.Random, training: list[dict]) -> list[dict]:
    seen = {json.dumps(r, ensure_ascii=False) for r in training}
    return [r for r in make_stage2(rng, HELDOUT_COUNTS, 4, 4) if json.dumps(r, ensure_ascii=False) not in seen]


def validate(out_dir: Path) -> dict:
    """Re-read the written files and check every record; return {file: (records, bytes)}."""
    stats = {}
    stage1_text = " ".join(t["value"] for line in (out_dir / "stage1.jsonl").read_text(encoding="utf-8").splitlines()
                           for t in json.loads(line)["conversations"]).casefold()
    stage2_lines = set((out_dir / "stage2.jsonl").read_text(encoding="utf-8").splitlines())
    for name in ("stage1.jsonl", "stage2.jsonl", "exam.jsonl", "heldout.jsonl"):
        path = out_dir / name
        lines = path.read_text(encoding="utf-8").splitlines()
        for line in lines:
            r = json.loads(line)
            if name == "stage1.jsonl":
                validate_turns(r["conversations"], "from", "value", {"system": "system", "human": "user", "gpt": "assistant"})
                text = "".join(t["value"] for t in r["conversations"] if t["from"] != "system")
                words, han = len(text.split()), sum("\u4e00" <= ch <= "\u9fff" for ch in text)
                assert (han <= 200) if han else (words <= 120), (words, han, line)
            elif name in ("stage2.jsonl", "heldout.jsonl"):
                validate_turns(r["messages"], "role", "content", {"system": "system", "user": "user", "assistant": "assistant"})
                assert name == "stage2.jsonl" or line not in stage2_lines, "a held-out record is a training record"
            else:
                assert set(r) == {"question", "options", "answer", "subject"}, r
                assert list(r["options"]) == list("ABCD") and r["answer"] in r["options"], r
                assert len(set(r["options"].values())) == 4 and all(v.strip() for v in r["options"].values()), r
                assert r["subject"] in EXAM_QUOTA and r["question"].strip(), r
                # answerable from the stage-1 knowledge data: the right option's text is said there
                assert r["options"][r["answer"]].casefold().rstrip(".") in stage1_text, r
        stats[name] = (len(lines), path.stat().st_size)
    return stats


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
    write_jsonl(OUT_DIR / "stage1.jsonl", make_stage1(random.Random(SEED + 1)))
    stage2 = make_stage2(random.Random(SEED + 2))
    write_jsonl(OUT_DIR / "stage2.jsonl", stage2)
    write_jsonl(OUT_DIR / "exam.jsonl", make_exam(random.Random(SEED + 3)))
    write_jsonl(OUT_DIR / "heldout.jsonl", make_heldout(random.Random(SEED + 4), stage2))
    for name, (count, size) in validate(OUT_DIR).items():
        print(f"{name}: {count} records, {size} bytes")


if __name__ == "__main__":
    main()
