"""Certifying commercial vision APIs by querying them (Salman et al. 2020, Section 4).

Plain Python and PyTorch, no Ray (the Ray layer is actors/api_sampler.py, actors/api_actor.py
and jobs/certify_api.py). One image's queries go through the same driver as a model's votes
(`pipeline.certify.run.CertifyRun`); what is particular to an API is grouped by concept, each
group importing only the ones below it (contracts in pyproject.toml):

the run (run/): one `certify-api` invocation
    run/prepare      config loading, image selection, the optional denoiser, the run identity
                     (so a resume with other settings is refused)
    run/modes        fixed n or sequential: which CertifyRuns an invocation makes of the API
                     sampler, and what its summary says
    run/chunk_votes  sequential runs: the clean query's label, each chunk's answers as one vote
                     row, the certifier rebuilt from every answer so far
    run/state        the driver's view of the answers: what each image still needs, its vote
                     rows once complete, the printed summary

the books (books/): what was asked, answered, spent
    books/journal    every call written before it is sent and when it is answered, so a kill
                     never loses or repeats a paid answer
    books/querylog   the journals compacted into a Parquet log of every query; vote rows
                     rebuilt from it (any n0 <= n0, n <= n); what the run spent
    books/budget     max queries, cost and tokens, per invocation and per run, reserved per
                     attempt (a chat call: its largest prompt so far plus the answer cap) so
                     that no limit can be passed
    books/ledger     the one place a call is granted: budget, journal and rate limit together
    books/billing    which answers a provider bills

the query (query/): one image's queries in an actor
    query/units        the queries an image needs (clean, n0, n), cut into work units of one
                       noise chunk each
    query/worker       runs a unit: noisy images, PNG, queries in parallel threads, result rows
    query/noisy_images x + delta (optionally denoised), addressed like the local engine's noise,
                       so a resumed run sends the very same images
    query/encoding     clip, round to 8 bits, lossless PNG
    query/retry        one query: a grant (`Permit`) per attempt, back-off with jitter

shared by the three groups
    config       the certify-api settings (no secrets: only the names of variables)
    errors       what can go wrong with a query, sorted by what to do (retry, stop, record);
                 an error's `kind` is the status its call is journaled with
    secrets      credentials scrubbed from every error text
    ratelimit    query starts per second and queries in flight, one limit for the whole job
                 (held by the ledger), slower after throttling
    providers/   AWS Rekognition (boto3), Google Cloud Vision (google-cloud-vision, REST),
                 Azure AI Vision (REST), Clarifai (REST): image -> labels with scores; and
                 vision-language models behind OpenAI-compatible chat APIs (openai_chat:
                 image + prompt -> one class, refusals and answers outside the classes a
                 "no class" vote)
    chat_settings  the chat model, prompt, classes, temperature/seed, token prices and
                 per-minute limits of the `openai` provider (all but the prices and limits
                 in the run identity)

apart
    emulator/    `dsmooth api-emulator`: a local stand-in for the providers' wire protocols,
                 with a classifier and injected faults; it shares no code with the client
"""
