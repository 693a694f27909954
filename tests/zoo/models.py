"""The zoo: small models from every framework slipstream converts, built from code, nothing downloaded.

Each entry builds its model (random weights, or fitted in a fraction of a second), says how to convert it,
gives one request's inputs and computes the answer the source framework itself gives on them: the served
answer is checked against that, not against the bundle. Frameworks are imported inside the builders, so
listing the zoo imports none of them. tests/zoo/test_zoo.py and benchmarks/zoo.py both run this list.
"""

from __future__ import annotations

from tests.zoo import tabular_builders as tab
from tests.zoo import tf_builders as tfb
from tests.zoo import torch_builders as tb
from tests.zoo.base import CONV_IS_SLOW, NOTHING_TO_QUANTIZE, Entry

# Tree ensembles (ai.onnx.ml TreeEnsemble*) and linear models (ai.onnx.ml LinearClassifier/LinearRegressor)
# have no MatMul, Gemm or Conv for dynamic int8 to work on.
TREES = LINEAR = NOTHING_TO_QUANTIZE

ZOO: tuple[Entry, ...] = (
    Entry("torch-mlp", "torch", "MLP", tb.torch_mlp),
    Entry("torch-resnet", "torch", "CNN, residual blocks + BatchNorm", tb.torch_resnet, CONV_IS_SLOW),
    Entry("torch-mobilenet", "torch", "depthwise-separable CNN", tb.torch_mobilenet, CONV_IS_SLOW),
    Entry("torch-conv1d", "torch", "1-D CNN", tb.torch_conv1d, CONV_IS_SLOW),
    Entry("torch-vit", "torch", "ViT (TransformerEncoderLayer)", tb.torch_vit, CONV_IS_SLOW),
    Entry("torch-lstm", "torch", "LSTM", tb.recurrent("lstm")),
    Entry("torch-gru", "torch", "GRU", tb.recurrent("gru")),
    Entry("bert-classifier", "transformers", "BERT encoder + classifier", tb.bert_classifier),
    Entry("gpt2-decoder", "transformers", "GPT-2 decoder, in memory", tb.gpt2_decoder),
    Entry("gpt2-directory", "transformers", "GPT-2 decoder, saved directory", tb.gpt2_directory),
    Entry("keras-two-inputs", "keras", "functional, 2 inputs (dense + conv)", tfb.keras_two_inputs, CONV_IS_SLOW),
    Entry("keras-two-heads", "keras", "functional, 2 inputs, 2 outputs", tfb.keras_two_heads),
    Entry("tflite-float", "tflite", "MLP, float32", tfb.tflite_float),
    Entry("tflite-int8", "tflite", "MLP, int8 weights and activations", tfb.tflite_int8),
    Entry("tflite-int8-io", "tflite", "MLP, int8 throughout, int8 input and output", tfb.tflite_int8_io),
    Entry("sk-logistic", "sklearn", "logistic regression", tab.numeric_classifier(tab.logistic_regression, 22), LINEAR),
    Entry("sk-ridge", "sklearn", "ridge regression", tab.ridge_regression, LINEAR),
    Entry("sk-mlp", "sklearn", "MLP classifier", tab.numeric_classifier(tab.sklearn_mlp, 23)),
    Entry("sk-random-forest", "sklearn", "random forest", tab.numeric_classifier(tab.random_forest, 24), TREES),
    Entry("sk-gboost", "sklearn", "gradient boosting", tab.numeric_classifier(tab.gradient_boosting, 25), TREES),
    Entry("sk-hist-gboost", "sklearn", "HistGradientBoosting", tab.numeric_classifier(tab.hist_gboost, 26), TREES),
    Entry("sk-isolation-forest", "sklearn", "isolation forest", tab.isolation_forest, TREES),
    Entry("sk-one-class-svm", "sklearn", "one-class SVM", tab.one_class_svm, NOTHING_TO_QUANTIZE),
    Entry("df-logistic", "sklearn", "DataFrame → logistic", tab.frame_pipeline(tab.logistic_regression, 27), LINEAR),
    Entry("df-hist-gboost", "sklearn", "DataFrame → HistGB", tab.frame_pipeline(tab.hist_gboost, 28), TREES),
    Entry("lightgbm", "lightgbm", "LGBMClassifier", tab.lightgbm_classifier, TREES),
    Entry("xgboost", "xgboost", "XGBClassifier", tab.xgboost_classifier, TREES),
    Entry("catboost", "catboost", "CatBoostClassifier", tab.catboost_classifier, TREES),
)  # fmt: skip

BY_NAME: dict[str, Entry] = {e.name: e for e in ZOO}
