//! The kernel and stack image a VM boots, built on demand (once, then
//! cached), with the build's progress passed on.

use super::*;

impl LocalProvisioner {
    /// Kernel and stack image, building them on demand.
    pub(super) async fn image_for(
        &self,
        stack: &str,
        progress: &dyn ProgressSink,
    ) -> Result<(kernel::KernelSet, crate::image::ImageInfo), ProvisionError> {
        let stack = stack.to_owned();
        step(
            progress,
            Stage::Image,
            Some(format!("{stack} (built once, then cached)")),
        );
        kennel_core::fault::point("image");
        // The build runs on a blocking thread and says what it does through
        // a channel; this side passes that on and, while a long step is
        // silent (mmdebstrap installing packages), repeats it with the time
        // so far, so the person who asked never waits a minute in silence.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let images = self.images.clone();
        let build = self.blocking(Stage::Image, move |runner| {
            let mut say = |what: &str, s: &str| {
                let _ = tx.send(format!("{what}: {s}"));
            };
            images.ensure(&stack, runner, &mut say)
        });
        tokio::pin!(build);
        let started = Instant::now();
        let mut last: Option<String> = None;
        let mut tick = tokio::time::interval(IMAGE_HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                r = &mut build => return r,
                Some(m) = rx.recv() => {
                    step(progress, Stage::Image, Some(format!("{m} ({}s)", started.elapsed().as_secs())));
                    last = Some(m);
                    tick.reset();
                }
                _ = tick.tick() => {
                    if let Some(m) = &last {
                        step(progress, Stage::Image, Some(format!("{m} ({}s)", started.elapsed().as_secs())));
                    }
                }
            }
        }
    }
}

/// Where a VM's kernel and stack image come from: built with mmdebstrap
/// and cached by content hash ([`BuiltImages`]), or a fake in tests.
pub trait GuestImages: Send + Sync {
    /// The kernel and `stack`'s image, built if missing. `say(what, step)`
    /// hears each step of a build. Runs on a blocking thread.
    fn ensure(
        &self,
        stack: &str,
        runner: &dyn Runner,
        say: &mut dyn FnMut(&str, &str),
    ) -> Result<(kernel::KernelSet, crate::image::ImageInfo), String>;
}

/// Images built on this host from the stack files and the guest recipe.
#[derive(Debug, Clone)]
pub struct BuiltImages {
    pub stacks_dir: PathBuf,
    pub recipe_dir: PathBuf,
    pub images_dir: PathBuf,
    pub apt_sources: PathBuf,
    pub apt_cache: Option<PathBuf>,
}

impl GuestImages for BuiltImages {
    fn ensure(
        &self,
        stack: &str,
        runner: &dyn Runner,
        say: &mut dyn FnMut(&str, &str),
    ) -> Result<(kernel::KernelSet, crate::image::ImageInfo), String> {
        let stacks = Stacks::load(&self.stacks_dir);
        let base = stacks
            .get(crate::stacks::BASE)
            .ok_or("the base stack is missing")?;
        let st = stacks
            .get(stack)
            .ok_or_else(|| format!("there is no usable stack '{stack}'"))?;
        let images = Images::new(&self.images_dir);
        // The newest kernel already built, without asking apt which is
        // current (that takes a second); `kennel image build` refreshes it.
        let k = match kernel::KernelSet::latest(images.dir()) {
            Some(k) => k,
            None => kernel::ensure(images.dir(), runner, &mut |s| say("kernel", s))
                .map_err(|e| anyhow_chain(&e))?,
        };
        let recipe = Recipe::load(&self.recipe_dir).map_err(|e| e.to_string())?;
        let modules = k.module_tree();
        let env = BuildEnv {
            recipe: &recipe,
            kernel: &k.manifest,
            apt_sources: &self.apt_sources,
            apt_cache: self.apt_cache.as_deref(),
            modules: modules.as_deref(),
        };
        let what = format!("building the {stack} image");
        let (info, _) = images
            .ensure(&env, base, st, runner, &mut |s| say(&what, s))
            .map_err(|e| anyhow_chain(&e))?;
        Ok((k, info))
    }
}
