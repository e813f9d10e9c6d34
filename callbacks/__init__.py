"""Lightning callbacks for detector: checkpointing, EMA, inference export."""
