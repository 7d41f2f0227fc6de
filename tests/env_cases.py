"""The classic-task configurations every env-level test file runs over."""

CLASSIC_CASES = [
    ("CartPole", {}),
    ("Pendulum", {}),
    ("MountainCar", {}),
    ("Reacher", {}),
    ("Reacher", {"num_joints": 3}),
    ("Swimmer", {}),
    ("Swimmer", {"num_urchins": 0}),
    ("Swimmer", {"num_urchins": 8}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CLASSIC_CASES]
