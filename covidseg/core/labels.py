"""The dataset's vocabulary, named once: the image classes of COVID-QU-Ex and the mask targets a
model can segment. Data, settings checks and model files all spell them from here."""

CLASSES = ("COVID-19", "Non-COVID", "Normal")
TARGETS = ("infection", "lung")
