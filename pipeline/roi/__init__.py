"""Stage 4, regions of interest: 2D images → region rows (box, mask RLE, mm geometry).

regions.py          labels route: connected components of the label slice; ``RegionConfig``
annotated.py        annotation tables' shapes carried from their stored frame to the images
                    (the pixels' own transform) → regions or segmenter prompts
propose.py          the model stage (boxes and detector routes): one detector pass and one
                    segmenter encoder pass per image; makes regions only, never captions
segment.py          SAM-family segmenters behind one interface (+ Otsu, box-only);
segment_models.py   their checkpoints, parts and preprocessing
detect.py           YOLO detector (ultralytics, offline); detector_data.py: corpus → YOLO
                    dataset and box-level evaluation (for ``train-detector``)
"""
