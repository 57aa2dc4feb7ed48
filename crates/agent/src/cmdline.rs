//! Agent settings from the kernel command line (`supermachine.*=`), set by the host engine.

/// What the host told the agent at boot.
#[derive(Debug, Clone)]
pub struct Cmdline {
    /// Name of the virtio-console port of the host channel (`supermachine.port=`).
    pub port: String,
    pub debug: bool,
}

impl Cmdline {
    pub fn read() -> Self {
        let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Self {
        let mut cmdline = Cmdline {
            port: "agent.0".to_string(),
            debug: false,
        };
        for word in text.split_ascii_whitespace() {
            if let Some(value) = word.strip_prefix("supermachine.port=") {
                cmdline.port = value.to_string();
            } else if let Some(value) = word.strip_prefix("supermachine.debug=") {
                cmdline.debug = value == "1";
            }
        }
        cmdline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_settings_among_kernel_arguments() {
        let c =
            Cmdline::parse("console=ttyS0 supermachine.port=ctl.1 quiet supermachine.debug=1\n");
        assert_eq!(c.port, "ctl.1");
        assert!(c.debug);
    }

    #[test]
    fn defaults_without_agent_settings() {
        let c = Cmdline::parse("console=ttyS0");
        assert_eq!(c.port, "agent.0");
        assert!(!c.debug);
    }
}
