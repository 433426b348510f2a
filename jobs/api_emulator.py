"""Serve a local emulator of the AWS Rekognition, Google Cloud Vision, Azure AI Vision and
Clarifai label-detection APIs, and of an OpenAI-compatible chat endpoint (/v1/chat/completions,
a vision-language model used as a classifier), on 127.0.0.1, for trying and testing `certify-api` without
an account, a network connection or a bill.

The real client libraries talk to it through the endpoint override (`api.endpoint` in a
certify-api config): one port serves all four providers. It answers with a local
classifier: by default a built-in, deterministic colour/brightness scene classifier with
readable labels ("Sky", "Snow", "Foliage"...), or any dsmooth classifier checkpoint
(--classifier). Any non-empty credentials are accepted (use --auth-failure to refuse them).

Faults, drawn per request: --throttle P, --server-error P, --malformed P (probabilities),
--latency S with --latency-rate P, --auth-failure; chat only: --refusal P,
--garbage P (a reply naming no class), --retry-after S (on each 429). They can be changed while it runs:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from jobs.options import add_settings_arguments
    from pipeline.command_settings import EmulatorSettings

    add_settings_arguments(parser, EmulatorSettings)


def run(args: argparse.Namespace) -> int:
    from jobs.options import load_settings
    from pipeline.apis.emulator import CheckpointClassifier, EmulatorServer, FaultSettings
    from pipeline.command_settings import EmulatorSettings

    from pipeline.models import CheckpointError

    verbose = args.verbose
    args = load_settings(EmulatorSettings, args)
    try:
        classifier = CheckpointClassifier(args.classifier) if args.classifier else None
    except CheckpointError as error:  # a file the loader refuses is bad input: one line, exit 2
        raise ValueError(str(error)) from None
    faults = FaultSettings(
        auth_failure=args.auth_failure, throttle=args.throttle, server_error=args.server_error,
        malformed=args.malformed, latency_s=args.latency, latency_rate=args.latency_rate,
        refusal=args.refusal, garbage=args.garbage, retry_after_s=args.retry_after,
    )
    try:
        server = EmulatorServer(classifier, port=args.port, seed=args.seed, faults=faults, verbose=verbose)  # -v: method and path of each call (never headers)
    except OSError as error:
        raise ValueError(f"cannot listen on 127.0.0.1:{args.port}: {error.strerror or error}") from None
    print(f"api-emulator: listening on {server.url} (aws, google, azure, clarifai, openai at /v1; "
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
