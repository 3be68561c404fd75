"""Scoring at scale on Apache Beam (`pip install 'kiqa[beam]'`).

`kiqa.beam.pipeline` holds the transforms (`ListImages`, `ScoreImages`, `WriteScores`)
and `score_with_beam`; `kiqa.beam.handler` the RunInference `KiqaModelHandler`. Run it as
`python -m kiqa.beam` or `kiqa score-beam`. Nothing is imported here, so `import kiqa.beam`
does not need Beam.
"""
