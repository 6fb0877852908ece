// transformers.js (pinned in package.json) runs a `palikit export` folder, as a user's page or script
// would: node generate.mjs MODELS_DIR MODEL_ID IMAGE PROMPT... -> one JSON line per prompt.
import { env, AutoProcessor, PaliGemmaForConditionalGeneration, RawImage } from '@huggingface/transformers';

const [modelsDir, modelId, imagePath, ...prompts] = process.argv.slice(2);
env.allowRemoteModels = false;  // nothing from the hub: the exported folder only
env.localModelPath = modelsDir;
const processor = await AutoProcessor.from_pretrained(modelId);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(modelId, { dtype: 'fp32' });
const image = await RawImage.read(imagePath);
for (const prompt of prompts) {
  const inputs = await processor(image, prompt);
  const out = await model.generate({ ...inputs, max_new_tokens: 20, do_sample: false });
  const [text] = processor.batch_decode(out.slice(null, [inputs.input_ids.dims.at(-1), null]),
                                        { skip_special_tokens: true });
  console.log(JSON.stringify({ prompt, text }));
}
