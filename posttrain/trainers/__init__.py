"""The training loops: one shared loop (base.py) and the SFT, reward-model, DPO and RL trainers."""
