"""Serve a local emulator of the AWS Rekognition, Google Cloud Vision, Azure AI Vision and
Clarifai label-detection APIs on 127.0.0.1, for trying and testing `certify-api` without
an account, a network connection or a bill.

The real client libraries talk to it through the endpoint override (`api.endpoint` in a
certify-api config): one port serves all four providers. It answers with a local
classifier: by default a built-in, deterministic colour/brightness scene classifier with
readable labels ("Sky", "Snow", "Foliage"...), or any dsmooth classifier checkpoint
(--classifier). Any non-empty credentials are accepted (use --auth-failure to refuse them).

Faults, drawn per request: --throttle P, --server-error P, --malformed P (probabilities),
--latency S with --latency-rate P, --auth-failure. They can be changed while it runs:
  curl -X POST localhost:PORT/_emulator/faults -d '{"provider": "aws", "throttle": 0.2}'
  curl localhost:PORT/_emulator/calls          # calls received per provider
  curl -X POST localhost:PORT/_emulator/reset

examples:
  dsmooth api-emulator --port 8790
  dsmooth api-emulator --port 8790 --throttle 0.1 --server-error 0.05 --latency 0.2"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1], got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8790, help="port on 127.0.0.1 (0 picks a free one; default 8790)")
    parser.add_argument("--classifier", metavar="CKPT", help="answer with this dsmooth classifier checkpoint "
                        "instead of the built-in colour classifier")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault draws (default 0)")
    parser.add_argument("--throttle", type=_probability, default=0.0, metavar="P", help="probability of a throttling answer (429)")
    parser.add_argument("--server-error", type=_probability, default=0.0, metavar="P", help="probability of a 5xx answer")
    parser.add_argument("--malformed", type=_probability, default=0.0, metavar="P", help="probability of a 200 with a broken body")
    parser.add_argument("--latency", type=_seconds, default=0.0, metavar="S", help="seconds added before answering")
    parser.add_argument("--latency-rate", type=_probability, default=1.0, metavar="P", help="fraction of answers delayed (default 1)")
    parser.add_argument("--auth-failure", action="store_true", help="refuse every call as with invalid credentials")


def run(args: argparse.Namespace) -> int:
    from pipeline.apis.emulator import CheckpointClassifier, EmulatorServer, FaultSettings

    from pipeline.models import CheckpointError

    try:
        classifier = CheckpointClassifier(args.classifier) if args.classifier else None
    except CheckpointError as error:  # a file the loader refuses is bad input: one line, exit 2
        raise ValueError(str(error)) from None
    faults = FaultSettings(
        auth_failure=args.auth_failure, throttle=args.throttle, server_error=args.server_error,
        malformed=args.malformed, latency_s=args.latency, latency_rate=args.latency_rate,
    )
    try:
        server = EmulatorServer(classifier, port=args.port, seed=args.seed, faults=faults, verbose=args.verbose)  # -v: method and path of each call (never headers)
    except OSError as error:
        raise ValueError(f"cannot listen on 127.0.0.1:{args.port}: {error.strerror or error}") from None
    print(f"api-emulator: listening on {server.url} (aws, google, azure, clarifai; "
          f"classifier: {args.classifier or 'built-in colour classifier'})", flush=True)
    print(f"api-emulator: use `api: {{provider: aws, endpoint: {server.url}}}` in a certify-api config; "
          "Ctrl-C stops", flush=True)
    stopping = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stopping.set()
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
    stats = server.stats()["calls"]
    print(f"api-emulator: stopped after {stats['total']} calls ({', '.join(f'{k} {v}' for k, v in stats.items() if k != 'total')})",
          file=sys.stderr, flush=True)
    return 0
