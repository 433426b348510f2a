"""Certifying commercial vision APIs by querying them (Salman et al. 2020, Section 4).

Plain Python and PyTorch, no Ray (the Ray layer is actors/api_actor.py and
jobs/certify_api.py):

    config      the certify-api YAML schema (no secrets: only the names of variables)
    providers/  AWS Rekognition (boto3), Google Cloud Vision (google-cloud-vision, REST),
                Azure AI Vision (REST), Clarifai (REST): image -> labels with scores; and
                vision-language models behind OpenAI-compatible chat APIs (openai_chat)
    chat_settings the chat model, prompt, classes, token prices and per-minute limits
    errors      transient / fatal / malformed, as the retry loop needs them
    secrets     scrubbing of credentials from every error text
    ratelimit   queries per second and in flight, per client
    retry       one query: budget reserved per attempt, back-off with jitter
    budget      max queries and max cost, never passed
    encoding    clip, round to 8 bits, PNG (lossless)
    sampling    the noisy (denoised) images, addressed like the local engine's noise
    plan        the queries an image needs, as work units
    worker      runs units: noise -> denoiser -> PNG -> query -> query-log rows
    querylog    Parquet log of every query; vote rows rebuilt from it (any n0 <= n0, n <= n)
    runstate    driver bookkeeping: resume, votes per finished image, spending, report
    prepare     config loading, image selection, denoiser loading, run identity
    emulator/   a local stand-in for the four APIs (dsmooth api-emulator)
"""
