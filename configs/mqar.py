"""Multi-query associative recall (Zoology) with a 2-layer attention model: a recall sanity
task whose eval accuracy counts only the answer positions."""
from train.config import AttentionConfig, Config, DataConfig, MQARConfig, ModelConfig, OptimizerConfig, TrainConfig


def config() -> Config:
    return Config(
        name="mqar",
        model=ModelConfig(d_model=128, num_layers=2, pattern=("attn",),
                          mixers={"attn": AttentionConfig(num_heads=2)}),
        data=DataConfig(source="mqar", seq_len=128, batch_size=32,
                        mqar=MQARConfig(vocab_size=512, num_kv_pairs=8)),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=100, weight_decay=0.1),
        train=TrainConfig(steps=2000, log_every=50, eval_every=250, eval_batches=4, checkpoint_every=500),
    )
