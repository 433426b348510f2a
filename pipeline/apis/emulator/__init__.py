"""A local stand-in for the AWS, Google, Azure and Clarifai vision APIs (no Ray, no network).

Serves each provider's wire protocol on 127.0.0.1 so the real client libraries can be
pointed at it with an endpoint override; answers with a local classifier; injects
throttling, 5xx, malformed bodies, latency and authentication failures on demand; counts
calls per provider. Used by the tests and by `dsmooth api-emulator`.
"""

from pipeline.apis.emulator.classifier import CheckpointClassifier, ColourClassifier
from pipeline.apis.emulator.faults import FaultSettings
from pipeline.apis.emulator.server import HOST, EmulatorServer

__all__ = ["HOST", "CheckpointClassifier", "ColourClassifier", "EmulatorServer", "FaultSettings"]
