"""copilink-rules: a policy engine that keeps a trade copier's follower accounts safe."""

__version__ = "0.1.0"
